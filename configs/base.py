"""Defaults shared by every config: the groups and names train.py and the docs rely on.

Every run option (config.train, .optim, .data, .mesh, .checkpoint) and its default is declared
once, with its rule, in `dsjax/run_config.py`; `default_config()` builds those groups from there.
Add an option there (one line), not here. `config.model` holds the fields of `dsjax.ModelConfig`
that each config file fills in; the ones below are run choices every config shares.
"""

from __future__ import annotations

import ml_collections

from dsjax.run_config import default_config


def get_base_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.name = "base"
    c.seed = 0
    c.model.attention_impl = "auto"  # auto/reference/chunked/cudnn/splash (layers/attention.py)
    c.model.fp8 = False  # DeepSeek-V3 FP8 training recipe (dsjax/model/fp8.py)
    c.model.moe_capacity_factor = 0.0  # 0 = dropless expert all-to-all; c > 0 caps its buffer
    c.model.moe_exchange_block = 0  # c > 0: expert all-to-all in rounds of c tokens per shard
    c.model.moe_fp8_dispatch = False  # with fp8: FP8 expert all-to-all payload (half the bytes)
    return c
