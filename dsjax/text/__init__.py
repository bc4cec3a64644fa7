"""Text <-> tokens: the byte-level BPE tokenizer (trained or loaded from tokenizer.json) and the
chat template. Shared by training, RL, inference and serving."""
