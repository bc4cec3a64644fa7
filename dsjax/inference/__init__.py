"""Inference: sampling, the one decode core (`decode`: prefill, step, speculative verification),
`generate`, the continuous-batching engine, and `loading` (a train.py work directory or an HF
directory -> config, variables, tokenizer)."""
