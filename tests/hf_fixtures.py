"""Helpers for the Hugging Face import/export tests: tiny random HF DeepSeek-V3 models on disk.

Everything here builds reference material with HF transformers / torch / NumPy only, never with
`dsjax.checkpoints.hf`, so the tests compare dsjax against independent code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

BASE: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    rope_parameters=YARN,
    max_position_embeddings=64,
    num_nextn_predict_layers=0,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
)

# HF tensors that the FP8 release never quantises are everything but these 2-D projections.
FP8_QUANTISED_SUFFIXES = (
    "q_a_proj.weight",
    "q_b_proj.weight",
    "q_proj.weight",
    "kv_a_proj_with_mqa.weight",
    "kv_b_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)
FP8_MAX = 448.0
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def hf_config(**overrides: Any) -> DeepseekV3Config:
    """A tiny DeepseekV3Config (eager attention, float32, no MTP) with `overrides` applied."""
    kw = {**BASE, **overrides}
    cfg = DeepseekV3Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, std: float = 0.1) -> None:
    """Replaces every weight by clearly non-trivial random values (fixed seed).

    Norm weights become 1 + 0.2 N(0,1); embeddings N(0, 1); linear and expert weights
    N(0, std^2) scaled so each output has roughly unit variance gain; router correction biases
    U[0, 0.3] (so sigmoid(s) + b > 0 and HF's 0.0 group masking equals the spec's -inf).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            fan_in = p.shape[-1]
            scale = max(std, 1.0 / math.sqrt(fan_in))
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.rand(b.shape, generator=gen))


def make_hf_model(seed: int = 0, **overrides: Any) -> DeepseekV3ForCausalLM:
    """A tiny random float32 DeepseekV3ForCausalLM in eval mode."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config(**overrides)).float().eval()
    randomize_(model, seed)
    return model


def separated_hf_model(seed: int = 0, gain: float = 1.5, **overrides: Any) -> DeepseekV3ForCausalLM:
    """A tiny random float32 HF model (`hf_config(**overrides)`) whose logits are well separated,
    like `dsjax.testing.random_variables`: weights N(0, (gain / sqrt(fan_in))^2), embeddings
    N(0, 1), norm weights 1 + 0.2 N(0, 1), router correction biases U[0, 0.3] (sigmoid + bias > 0,
    docs/spec.md §5)."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config(**overrides)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(gain / math.sqrt(p.shape[-1]) * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.rand(b.shape, generator=gen))
    return model


def save_hf_model(model: DeepseekV3ForCausalLM, path: Path) -> Path:
    """`save_pretrained` (per-expert keys on disk); returns `path`."""
    model.save_pretrained(path)
    return path


@torch.no_grad()
def hf_logits(model: DeepseekV3ForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """float32 HF logits [B, T, V]."""
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def tokens(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Random int32 token ids [batch, length]."""
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory."""
    return json.loads((path / "config.json").read_text())


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Overwrites config.json of a checkpoint directory."""
    (path / "config.json").write_text(json.dumps(config, indent=2))


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a single-file float checkpoint (safetensors' own reader)."""
    return load_file(str(path / "model.safetensors"))


def write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Overwrites model.safetensors (safetensors' own writer)."""
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------ MTP
@dataclasses.dataclass
class MtpModules:
    """Torch modules of one MTP depth, for an independent reference computation."""

    enorm: DeepseekV3RMSNorm
    hnorm: DeepseekV3RMSNorm
    eh_proj: nn.Linear
    head_norm: DeepseekV3RMSNorm
    block: nn.Module  # a DeepseekV3DecoderLayer built with layer_idx = num_hidden_layers
    layer: int


def add_mtp_layer(path: Path, model: DeepseekV3ForCausalLM, seed: int, tmp: Path) -> MtpModules:
    """Appends MTP layer N = num_hidden_layers to the checkpoint at `path` (as the release does).

    The decoder block comes from a second random HF model with one more layer (so layer N is a
    MoE layer built by HF itself and saved with HF's per-expert keys); enorm, hnorm, eh_proj and
    shared_head.norm are fresh random modules; embed_tokens and shared_head.head are copies of
    the main model's. config.json gets num_nextn_predict_layers = 1.
    """
    cfg = model.config
    n = cfg.num_hidden_layers
    d = cfg.hidden_size
    overrides = {k: getattr(cfg, k) for k in BASE if k != "rope_parameters"}
    overrides["rope_parameters"] = dict(cfg.rope_parameters)
    overrides["num_hidden_layers"] = n + 1
    donor = make_hf_model(seed, **overrides)
    save_hf_model(donor, tmp / "donor")
    donor_tensors = read_tensors(tmp / "donor")

    torch.manual_seed(seed + 1)
    mods = MtpModules(
        enorm=DeepseekV3RMSNorm(d, eps=cfg.rms_norm_eps),
        hnorm=DeepseekV3RMSNorm(d, eps=cfg.rms_norm_eps),
        eh_proj=nn.Linear(2 * d, d, bias=False),
        head_norm=DeepseekV3RMSNorm(d, eps=cfg.rms_norm_eps),
        block=donor.model.layers[n],
        layer=n,
    )
    randomize_(mods.eh_proj, seed + 10)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 20)
        for m in (mods.enorm, mods.hnorm, mods.head_norm):
            m.weight.copy_(1.0 + 0.2 * torch.randn(d, generator=gen))

    tensors = read_tensors(path)
    prefix = f"model.layers.{n}."
    for key, value in donor_tensors.items():
        if key.startswith(prefix):
            tensors[key] = value
    tensors[prefix + "enorm.weight"] = mods.enorm.weight.detach().numpy()
    tensors[prefix + "hnorm.weight"] = mods.hnorm.weight.detach().numpy()
    tensors[prefix + "eh_proj.weight"] = mods.eh_proj.weight.detach().numpy()
    tensors[prefix + "shared_head.norm.weight"] = mods.head_norm.weight.detach().numpy()
    tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].copy()
    write_tensors(path, tensors)
    config = read_config(path)
    config["num_nextn_predict_layers"] = 1
    write_config(path, config)
    return mods


@torch.no_grad()
def mtp_reference_logits(
    model: DeepseekV3ForCausalLM, mods: MtpModules, toks: np.ndarray
) -> np.ndarray:
    """Depth-1 MTP logits [B, T-1, V] from HF modules: position i predicts token i+2.

    h = the main model's last hidden state before the final norm (captured with a hook on
    model.norm), x = eh_proj([enorm(Emb(t[1:])); hnorm(h[:-1])]), then the HF decoder layer with
    HF's rotary embedding and causal mask for positions 0..T-2, then head(shared_head.norm(.)).
    """
    t = torch.as_tensor(np.asarray(toks), dtype=torch.long)
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.norm.register_forward_hook(
        lambda _m, inputs, _out: captured.__setitem__("h", inputs[0])
    )
    try:
        model(t)
    finally:
        hook.remove()
    h = captured["h"]
    emb = model.model.embed_tokens(t[:, 1:])
    x = mods.eh_proj(torch.cat([mods.enorm(emb), mods.hnorm(h[:, :-1])], dim=-1))
    positions = torch.arange(x.shape[1])[None]
    position_embeddings = model.model.rotary_emb(x, positions)
    mask = create_causal_mask(
        config=model.config,
        inputs_embeds=x,
        attention_mask=None,
        past_key_values=None,
        position_ids=positions,
        allow_is_causal_skip=False,
    )
    assert mask is not None
    y = mods.block(
        x, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings
    )
    return model.lm_head(mods.head_norm(y)).float().numpy()


# ------------------------------------------------------------------ FP8
def quantize_block_fp8(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The release recipe: per block, scale = amax / 448, W8 = (W / scale) as float8_e4m3fn."""
    out_dim, in_dim = w.shape
    rows, cols = math.ceil(out_dim / block), math.ceil(in_dim / block)
    scale = np.empty((rows, cols), np.float32)
    w8 = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
    for r in range(rows):
        for c in range(cols):
            sl = (slice(r * block, (r + 1) * block), slice(c * block, (c + 1) * block))
            tile = w[sl].astype(np.float32)
            s = np.float32(max(float(np.abs(tile).max()), 1e-12) / FP8_MAX)
            scale[r, c] = s
            w8[sl] = (tile / s).astype(ml_dtypes.float8_e4m3fn)
    return w8, scale


def dequantize_reference(
    w8: np.ndarray, scale: np.ndarray, block: tuple[int, int] = (128, 128)
) -> np.ndarray:
    """float64 reference dequantisation W8 * repeat(S), rounded once to float32."""
    s = np.repeat(np.repeat(scale.astype(np.float64), block[0], 0), block[1], 1)
    return (w8.astype(np.float64) * s[: w8.shape[0], : w8.shape[1]]).astype(np.float32)


def is_fp8_eligible(key: str, value: np.ndarray) -> bool:
    """Whether the release would store this tensor in FP8 (2-D projections, never the router)."""
    return value.ndim == 2 and key.endswith(FP8_QUANTISED_SUFFIXES) and "mlp.gate." not in key


def quantize_checkpoint_fp8(src: Path, dst: Path) -> dict[str, np.ndarray]:
    """Writes an FP8 copy of the checkpoint at `src` to `dst` (torch writer for F8_E4M3).

    Returns the float32 dequantised reference of every tensor (non-quantised ones unchanged).
    """
    dst.mkdir(parents=True, exist_ok=True)
    tensors = read_tensors(src)
    out: dict[str, torch.Tensor] = {}
    reference: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if is_fp8_eligible(key, value):
            w8, scale = quantize_block_fp8(value)
            out[key] = torch.from_numpy(w8.view(np.uint8).copy()).view(torch.float8_e4m3fn)
            out[key + "_scale_inv"] = torch.from_numpy(scale)
            reference[key] = dequantize_reference(w8, scale)
        else:
            out[key] = torch.from_numpy(value)
            reference[key] = value
    from safetensors.torch import save_file as torch_save_file

    torch_save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = read_config(src)
    config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    write_config(dst, config)
    return reference
