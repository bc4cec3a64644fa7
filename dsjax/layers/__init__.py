"""Building blocks of the DeepSeek-V3 model: norms, RoPE/YaRN, attention, MLA, MoE, SwiGLU."""
