"""Defaults shared by every config: the groups and names train.py and the docs rely on."""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0
    c.model = ml_collections.ConfigDict()  # fields of dsjax.ModelConfig; filled by each config
    c.model.attention_impl = "auto"  # auto/reference/chunked/cudnn/splash (layers/attention.py)
    c.model.fp8 = False  # DeepSeek-V3 FP8 training recipe (dsjax/model/fp8.py)
    c.model.moe_capacity_factor = 0.0  # 0 = dropless expert all-to-all; c > 0 caps its buffer
    c.model.moe_fp8_dispatch = False  # with fp8: FP8 expert all-to-all payload (half the bytes)

    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib"  # "stdlib", a glob of .txt/.jsonl/.parquet, or "arrayrecord:<glob>"
    c.data.seq_len = 256
    c.data.eval_fraction = 0.02
    c.data.tokenizer = ""  # path to a tokenizer.json (or dir); "" trains a BPE in the workdir
    c.data.tokenizer_train_bytes = 8_000_000
    c.data.max_documents = 0  # 0 = all
    c.data.shuffle_rows = 0  # train rows shuffled in windows of this many (0/1: packing order)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 16  # global, in sequences
    c.train.grad_accum = 1
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.eval_batches = 8
    c.train.mtp_weight = 0.3  # λ
    c.train.balance_loss_weight = 1e-4  # α
    c.train.bias_update_rate = 1e-3  # γ
    # DeepSeek Sparse Attention (model.index_topk > 0): how the lightning indexer trains (V3.2).
    # "off": not at all; "warmup": dense attention, only the indexers train, on their KL to the
    # dense attention distribution (V3.2: lr 1e-3, 1000 steps); "sparse": top-k attention, the
    # indexers on the KL over their selected keys, the rest on the LM loss (V3.2: lr 7.3e-6).
    c.train.dsa_stage = "off"
    c.train.indexer_loss_weight = 1.0  # weight of the indexer KL in the loss
    # none | full | offload | dots | dots_no_batch | save_attn | save_attn_ffn ("offload": as
    # "full", each layer's input kept in host memory until the backward pass; dsjax/model/transformer.py)
    c.train.remat = "full"
    # Cross-entropy chunk: positions of each sequence per chunk (a chunk's logits are
    # [batch, ce_chunk, vocab] float32); 0 = the whole sequence at once ([B,T,V] logits).
    c.train.ce_chunk = 0
    c.train.sample_prompt = "def "
    c.train.sample_tokens = 64
    c.train.sample_temperature = 0.7  # top-k 40; 0 = greedy
    # Pipeline parallelism (mesh.stage > 1; dsjax/train/pipeline.py, SPEC §13): the schedule,
    # "gpipe" | "1f1b" | "dualpipe" (DeepSeek's DualPipeV: 2 x stage chunks, rank i holds chunks
    # i and 2 x stage-1-i, F&B pairs), and the micro-batches each accumulation step is cut into
    # (0 = 2 x stage; dualpipe needs >= 2 x stage). The MoE layers must split evenly into chunks.
    c.train.pipeline_schedule = "1f1b"
    c.train.microbatches = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-3
    c.optim.min_lr_ratio = 0.1
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.moment_dtype = "float32"  # AdamW m and v storage: "float32" | "bfloat16" (V3: bf16)
    c.optim.host_offload = False  # optimizer state in host memory between steps (pinned_host)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.stage = 1  # pipeline stages (outermost axis: across TPU slices / GPU nodes)
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.expert = 1
    c.mesh.context = 1  # context parallelism: the sequence split over this many chips
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 200
    c.checkpoint.keep = 3
    return c
