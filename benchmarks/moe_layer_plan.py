"""One MoE layer's forward + backward compiled for a TPU slice (XLA:TPU, compile only): per-chip
temporaries and collectives for each `model.moe_exchange_block` given, at a full model's widths.

    python benchmarks/moe_layer_plan.py --config=deepseek_v3 --topology=v5p:4x4x8 --fsdp=2 \\
        --expert=64 --blocks=0,1024,256

Each chip holds `--tokens` tokens (one 4K sequence by default), the layer's parameters are split
by the rule table (float32 master weights) and the MoE picks its exchange with "auto"
(`--exchange` to force one). The gradient of the parameters and of x is computed; the loss is
the sum of the output. A quick stand-in for the whole train step (`python -m dsjax.plan`) when
the question is the MoE layer's buffers and collectives alone.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dsjax import run_config  # noqa: E402
from dsjax.model import sharding  # noqa: E402
from dsjax.model.layers.moe import MoE, exchange_group  # noqa: E402
from dsjax.plan import planner  # noqa: E402

GIB = 2**30


def _abstract_params(module, mesh, D: int):
    """The layer's parameters as ShapeDtypeStructs carrying the rule table's shardings."""
    key = jax.random.key(0)  # outside the mesh: no concrete array may exist on an AOT mesh
    x = jax.ShapeDtypeStruct((1, 8, D), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, 8), jnp.bool_)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        boxed = jax.eval_shape(module.init, key, x, valid)["params"]
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    is_box = lambda b: isinstance(b, nn.Partitioned)  # noqa: E731
    plain = jax.tree.map(lambda b: b.value if is_box(b) else b, boxed, is_leaf=is_box)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), plain, shardings
    )


def plan_layer(cfg, mesh, n_devices: int, tokens: int, exchange: str) -> dict:
    """Compiles grad(sum(MoE(x))) for params and x; returns memory and collectives."""
    module = MoE(cfg, exchange=exchange)
    D = cfg.hidden_size
    params = _abstract_params(module, mesh, D)
    shards = sharding.batch_shards(mesh)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    x = jax.ShapeDtypeStruct((shards, tokens, D), jnp.dtype(cfg.dtype), sharding=rows)
    valid = jax.ShapeDtypeStruct((shards, tokens), jnp.bool_, sharding=rows)
    replicated = NamedSharding(mesh, P())
    bias = {"bias": jax.ShapeDtypeStruct((cfg.n_routed_experts,), jnp.float32, sharding=replicated)}

    def loss(p, x, valid, b):
        y, _ = module.apply({"params": p, "moe_bias": b}, x, valid)
        return y.astype(jnp.float32).sum()

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, valid, bias)
        compiled, oom, dump = planner.compile_or_oom(lowered)
    if oom:
        return {"oom": oom}
    return {
        "memory": planner._memory_from_compiled(compiled, 0.0, dump),
        "collectives": planner._collectives(compiled, dump, n_devices),
        "group": exchange_group(cfg, mesh, tokens, exchange),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="deepseek_v3", help="a module of configs/")
    p.add_argument("--topology", default="v5p:4x4x8")
    p.add_argument("--fsdp", type=int, default=2)
    p.add_argument("--expert", type=int, default=64)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per chip")
    p.add_argument("--blocks", default="0,1024,256", help="moe_exchange_block values")
    p.add_argument("--exchange", default="auto", help="MoE.exchange")
    a = p.parse_args()
    run = run_config.parse(importlib.import_module(f"configs.{a.config}").get_config())
    target = planner.make_target(a.topology)
    mesh = sharding.make_mesh(data=1, fsdp=a.fsdp, expert=a.expert, devices=list(target.devices))
    print(f"{a.config} MoE layer fwd+bwd on {target.label}, mesh {dict(mesh.shape)}, "
          f"{a.tokens} tokens per chip")  # fmt: skip
    for block in (int(b) for b in a.blocks.split(",")):
        cfg = run.model.replace(moe_exchange_block=block)
        r = plan_layer(cfg, mesh, len(target.devices), a.tokens, a.exchange)
        if "oom" in r:
            print(f"  block {block}: out of memory: {r['oom']['message']}")
            continue
        m, ops = r["memory"], (r["collectives"] or {}).get("ops", {})
        coll = ", ".join(
            f"{k} x{v['count']} {v['result_bytes'] / GIB:.2f} GiB"
            for k, v in ops.items()
            if v.get("count")
        )
        print(f"  block {block}: exchange {'x'.join(r['group']) or 'none'}; temporaries "
              f"{m['temp_bytes'] / GIB:.2f} GiB; {coll}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
