"""`APIError`: an HTTP error in the OpenAI shape `{"error": {message, type, param, code}}`."""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "bad_field"]


class APIError(Exception):
    """An error response: HTTP `status` with the OpenAI error object.

    `type` is "invalid_request_error" (4xx caused by the request), "authentication_error",
    "not_found_error" or "server_error"; `param` names the request field at fault.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        message = _printable(message)
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param = None if param is None else _printable(param)
        self.code, self.headers = code, headers

    def body(self) -> dict[str, Any]:
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _printable(text: str) -> str:
    """`text` with lone surrogates (not encodable as UTF-8, e.g. from a client's "\\ud800" key)
    written as escapes, so the error body can always be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_field(param: str, rule: str, code: str | None = None) -> APIError:
    """A 400 naming the request field `param` (as the client spelled it) and the rule broken."""
    return APIError(400, f"'{param}': {rule}", param=param, code=code)
