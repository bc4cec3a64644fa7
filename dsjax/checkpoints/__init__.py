"""Checkpoints: Hugging Face safetensors import/export (`hf`, FP8 file format `hf_fp8`), the
safetensors reader/writer and Orbax run checkpoints with checksums (`orbax_io`)."""
