"""Configs for the single-host Colab TPUs that notebooks/02_train_on_tpu.ipynb trains on.

One model for every chip: a small DeepSeek-V3-style MoE (11.8M parameters, 3.9M activated per
token, plus a 1.9M-parameter MTP module; MLA with q LoRA and YaRN, one dense layer then MoE
layers with grouped sigmoid routing and a shared expert), bf16 compute over float32 parameters,
trained on the Python standard library's source like configs/small.py. It is small so that a
Colab session spends its time training, not compiling (XLA:TPU compile time grows quickly with
the model and the tokens per step). What changes per chip is the batch and the mesh:

    chip   Colab runtime     devices            HBM per device   mesh             batch
    v5e    "v5e-1 TPU"       1 (TPU v5 lite)    15.75 GiB        1                16 x 1024
    v6e    "v6e-1 TPU"       1 (TPU v6 lite)    32 GiB           1                32 x 1024
    v2     "v2-8 TPU"        8 (TPU v2 cores)   8 GiB            fsdp=8           32 x 1024

    python train.py --config=configs/colab_tpu.py:v6e      # the chip after the colon

tests/notebooks_test.py compiles each chip's real train step with the planner (XLA:TPU, abstract
one-chip v5e / v6e topologies; with DSJAX_PLAN_FULL_SHAPES=1 also the v2-8 and at the batch and
sequence length above) and checks that it fits in HBM.
"""

from __future__ import annotations

from configs import small

# chip -> (global batch in sequences, mesh); the device kinds jax reports for each chip.
CHIPS = {
    "v5e": (16, dict(data=1, fsdp=1, expert=1, tensor=1)),
    "v6e": (32, dict(data=1, fsdp=1, expert=1, tensor=1)),
    "v2": (32, dict(data=1, fsdp=8, expert=1, tensor=1)),
}
DEVICE_KINDS = {"TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v6 lite": "v6e", "TPU v6e": "v6e",
                "TPU v2": "v2"}  # fmt: skip


def chip_for(device_kind: str) -> str:
    """The CHIPS key of a jax device kind (e.g. 'TPU v5 lite' -> 'v5e'); ValueError otherwise."""
    for kind, chip in DEVICE_KINDS.items():
        if device_kind.strip().lower() == kind.lower():
            return chip
    raise ValueError(
        f"device kind {device_kind!r} has no Colab config; known: {sorted(DEVICE_KINDS)}"
    )


def get_config(chip: str = "v5e"):
    """The run for one Colab TPU runtime: chip is 'v5e', 'v6e' or 'v2' (see the table above)."""
    if chip not in CHIPS:
        raise ValueError(f"chip={chip!r}: expected one of {sorted(CHIPS)}")
    batch, mesh = CHIPS[chip]
    c = small.get_config()  # configs/small.py's model, wider and deeper, in bf16
    c.name = f"colab_{chip}"
    c.model.update(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        q_lora_rank=128,
        rope_original_max_position=256,
        max_position_embeddings=4096,
        dtype="bfloat16",
    )
    c.data.seq_len = 1024
    c.data.tokenizer_train_bytes = 8_000_000
    c.train.steps = 2000
    c.train.batch_size = batch
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.remat = "full"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.mesh.update(**mesh)
    c.checkpoint.every = 500
    return c
