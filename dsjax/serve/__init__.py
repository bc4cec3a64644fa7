"""The OpenAI-compatible HTTP server: routes (`app.create_app`), request parsing and validation,
responses, errors, JSON limits, and the runner between requests and the engine."""
