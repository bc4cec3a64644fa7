"""One MoE layer (forward + backward) compiled by XLA:TPU for a TPU topology: bytes per chip.

Runs on a CPU-only machine with libtpu installed (the real TPU compiler, abstract arrays, nothing
executed). Prints the compiler's memory analysis per chip for each mesh given, e.g.

    TPU_SKIP_MDS_QUERY=1 python benchmarks/moe_dispatch_bench.py --topology=v5p:2x2x2 \
        --mesh=fsdp=8 --mesh=fsdp=2,expert=4 --tokens_per_chip=4096

Widths default to DeepSeek-V3's MoE layer (hidden 7168, moe_intermediate 2048, 256 experts top-8,
n_group 8, topk_group 4, one shared expert), bf16 compute, fp32 params. `--cpu_speed` instead times
a small config's MoE forward+backward on the local CPU (tokens/s), the mechanism behind issue 8.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other compiles may run beside this one
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dsjax.model.config import ModelConfig  # noqa: E402
from dsjax.model.layers.moe import MoE  # noqa: E402
from dsjax.model.sharding import BATCH_AXES, MESH_AXES, logical_to_sharding  # noqa: E402

V3_MOE = dict(
    hidden_size=7168,
    moe_intermediate_size=2048,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    dtype="bfloat16",
    param_dtype="float32",
)


def parse_mesh(text: str, n_devices: int) -> dict[str, int]:
    sizes = {a: 1 for a in MESH_AXES}
    for part in filter(None, text.split(",")):
        name, value = part.split("=")
        if name not in sizes:
            raise ValueError(f"--mesh {text!r}: unknown axis {name!r}; expected {MESH_AXES}")
        sizes[name] = int(value)
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"--mesh {text!r}: product != {n_devices} chips")
    return sizes


def loss_and_grad_fn(cfg: ModelConfig):
    """(params, bias, x_BTD, valid_BT) -> (loss, (grad params, grad x)): one layer fwd+bwd."""
    module = MoE(cfg)

    def loss(params, bias, x_BTD, valid_BT):
        y, stats = module.apply({"params": params, "moe_bias": bias}, x_BTD, valid_BT)
        return jnp.mean(jnp.square(y.astype(jnp.float32))) + stats["balance"], stats["counts"]

    def step(params, bias, x_BTD, valid_BT):
        (value, counts), grads = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)(
            params, bias, x_BTD, valid_BT
        )
        return value, counts, grads

    return module, step


def compile_layer(cfg: ModelConfig, mesh: Mesh, tokens: int, seq: int):
    module, step = loss_and_grad_fn(cfg)
    B = tokens // seq
    D = cfg.hidden_size
    key = jax.random.key(0)  # made outside the TPU mesh (nothing runs on it)
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(
            module.init,
            key,
            jax.ShapeDtypeStruct((1, seq, D), jnp.dtype(cfg.dtype)),
            jax.ShapeDtypeStruct((1, seq), jnp.bool_),
        )
        specs = nn.get_partition_spec(abstract)
        shard = logical_to_sharding(specs, mesh, shapes=nn.meta.unbox(abstract))
        params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            nn.meta.unbox(abstract["params"]),
            shard["params"],
        )
        bias = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
            nn.meta.unbox(abstract["moe_bias"]),
        )
        batch = NamedSharding(mesh, P(BATCH_AXES))
        x = jax.ShapeDtypeStruct((B, seq, D), jnp.dtype(cfg.dtype), sharding=batch)
        valid = jax.ShapeDtypeStruct((B, seq), jnp.bool_, sharding=batch)
        t0 = time.time()
        compiled = jax.jit(step).lower(params, bias, x, valid).compile()
        seconds = time.time() - t0
    mem = compiled.memory_analysis()
    return dict(
        temp_GiB=mem.temp_size_in_bytes / 2**30,
        argument_GiB=mem.argument_size_in_bytes / 2**30,
        output_GiB=mem.output_size_in_bytes / 2**30,
        compile_s=round(seconds, 1),
    )


def tpu_main(args):
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    devices = np.array(topo.devices)
    cfg = ModelConfig(
        **{**V3_MOE, "moe_impl": args.moe_impl, "moe_capacity_factor": args.capacity_factor}
    )
    for text in args.mesh:
        sizes = parse_mesh(text, devices.size)
        mesh = Mesh(
            devices.reshape([sizes[a] for a in MESH_AXES]),
            MESH_AXES,
            axis_types=(AxisType.Auto,) * len(MESH_AXES),
        )
        tokens = args.tokens_per_chip * devices.size
        result = compile_layer(cfg, mesh, tokens, min(args.seq, args.tokens_per_chip))
        row = dict(
            topology=args.topology, mesh=text, tokens_per_chip=args.tokens_per_chip,
            capacity_factor=args.capacity_factor, **result,
        )  # fmt: skip
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


def cpu_speed_main(args):
    """Times a small config's MoE layer forward+backward on the local CPU (one device)."""
    cfg = ModelConfig(
        hidden_size=256,
        moe_intermediate_size=128,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        dtype="float32",
        param_dtype="float32",
        moe_impl=args.moe_impl,
    )
    module, step = loss_and_grad_fn(cfg)
    B, T = 8, 256
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size))
    valid = jnp.ones((B, T), bool)
    variables = module.init(jax.random.key(0), x, valid)
    fn = jax.jit(step)
    jax.block_until_ready(fn(variables["params"], variables["moe_bias"], x, valid))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(variables["params"], variables["moe_bias"], x, valid))
        times.append(time.perf_counter() - t0)
    best = min(times)
    row = dict(impl=args.moe_impl, tile=args.moe_tile, tokens=B * T, best_ms=round(best * 1e3, 2))
    print(json.dumps({**row, "tokens_per_s": round(B * T / best)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", default="v5p:2x2x2")
    parser.add_argument("--mesh", action="append", default=[])
    parser.add_argument("--tokens_per_chip", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--moe_impl", default="auto")
    parser.add_argument("--moe_tile", type=int, default=128)
    parser.add_argument(
        "--capacity_factor", type=float, default=0.0,
        help="expert all-to-all receiver buffer of c*n*K rows (0: dropless worst case)",
    )  # fmt: skip
    parser.add_argument("--cpu_speed", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.cpu_speed:
        cpu_speed_main(args)
    else:
        tpu_main(args)


if __name__ == "__main__":
    main()
