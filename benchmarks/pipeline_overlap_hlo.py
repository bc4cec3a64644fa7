"""Does XLA:TPU overlap a DualPipe tick's expert all-to-alls with the other chunk's matmuls?

Compiles the real train step (`dsjax.train.step.jit_train_step`, pipelined over `stage`) for
abstract TPU v5p chips with the planner's target (libtpu, no TPU needed) and prints, for the
scheduled HLO computation of one pipeline tick (the scan body holding the expert exchanges):

- the order of its matmuls and exchanges labelled by the chunk they belong to: F (the forward
  chunk), Br (the backward chunk's recomputed forward) and B (its transpose), compressed into runs;
- every asynchronous exchange (`ragged-all-to-all-start` ... `-done`): its chunk, how many
  instructions the scheduler put between start and done, and how many of them are matmuls of
  the *other* chunk (F's exchange: Br/B matmuls; Br's or B's: F matmuls) — the overlap.

    python benchmarks/pipeline_overlap_hlo.py [--schedule=dualpipe] [--topology=v5p:2x2x2]
        [--layers=5] [--async_exchange=true|false] [--attention=reference|auto] [--dump=FILE]

`--async_exchange` is `config.train.async_exchange` (the pipeline's default, true: the step is
compiled with XLA:TPU's async ragged all-to-all; false: synchronous, libtpu's default). A small
MoE (hidden 512, 64 experts of width 512, so that the experts' token exchange is chosen over
gathering their weights), 1 dense + `--layers - 1` MoE layers, bf16, reference attention
(`--attention=auto`: splash, the TPU default, inside the pipeline's `stage` shard_map).
With 5 layers each DualPipe chunk holds one MoE layer, with `--layers=9` two (a chunk runs its
layers as a `lax.scan` of one-layer stacks: libtpu 0.0.42 stopped on the layer stack's own
`nn.scan` of two or more MoE layers, "PartitionId instruction is not supported"; RESULTS.md).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from flax import linen as nn  # noqa: E402

from configs.small import get_config  # noqa: E402
from dsjax.model import sharding  # noqa: E402
from dsjax.model.transformer import Transformer  # noqa: E402
from dsjax.plan import planner  # noqa: E402  (sets the libtpu environment first)
from dsjax.train import step as ts  # noqa: E402

EXCHANGE = ("ragged-all-to-all(", "ragged-all-to-all-start(")


def compile_step(schedule: str, topology: str, layers: int = 5, async_exchange: bool = True,
                 attention: str = "reference"):  # fmt: skip
    """(optimized HLO text, the compiler's memory analysis) of the pipelined train step."""
    c = get_config()
    c.model.update(num_hidden_layers=layers, dtype="bfloat16", attention_impl=attention,
                   hidden_size=512, moe_intermediate_size=512, n_routed_experts=64)  # fmt: skip
    c.mesh.update(stage=2, data=1, expert=4)
    c.train.update(pipeline_schedule=schedule, microbatches=4, batch_size=16,
                   async_exchange=async_exchange)  # fmt: skip
    c.data.seq_len = 256
    target = planner.make_target(topology)
    mesh = sharding.make_mesh(**c.mesh, devices=list(target.devices))
    model, (tx, lr) = Transformer(ts.model_config(c)), ts.make_optimizer(c)
    abstract, shardings = ts.state_shardings(model, tx, mesh, c.data.seq_len)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        step = ts.jit_train_step(model, tx, lr, c, shardings=shardings, mesh=mesh, donate=False)
        batch = planner._batch_abstract(mesh, c.train.batch_size, c.data.seq_len)
        compiled = step.lower(abstract, batch).compile()
    print(f"compiled for {topology} in {time.perf_counter() - t0:.0f}s")
    return compiled.as_text(), compiled.memory_analysis()


def computations(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    name = None
    for line in text.split("\n"):
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return out


def chunk_of(line: str) -> str:
    """F / Br / B from the JAX op name: the backward chunk is `jax.vjp` of the forward, so its
    recomputed forward carries jvp(...) and its transpose transpose(jvp(...))."""
    op = re.search(r'op_name="([^"]*)"', line)
    name = op.group(1) if op else ""
    return "B" if "transpose(jvp(" in name else ("Br" if "jvp(" in name else "F")


def is_matmul(line: str) -> bool:
    op = re.search(r'op_name="([^"]*)"', line)
    return "convolution" in line or "dot_general" in (op.group(1) if op else "")


def tick_order(body: list[str]) -> list[tuple[str, str]]:
    """(what, chunk) per matmul / exchange / ppermute start, in schedule order."""
    seq = []
    for line in body:
        if any(e in line for e in EXCHANGE):
            seq.append(("A2A", chunk_of(line)))
        elif is_matmul(line):
            seq.append(("mm", chunk_of(line)))
        elif "collective-permute-start" in line:
            seq.append(("ppermute", ""))
    return seq


def runs(seq: list[tuple[str, str]]) -> str:
    out, prev, n = [], None, 0
    for s in [*seq, None]:
        if s == prev:
            n += 1
            continue
        if prev is not None:
            out.append(f"{prev[0]}:{prev[1] or '-'}x{n}")
        prev, n = s, 1
    return " ".join(out)


def async_exchanges(body: list[str]) -> list[dict]:
    """Per `ragged-all-to-all-start` of the tick: its chunk, the instructions scheduled between
    it and its `-done`, and the matmuls among them by chunk."""
    out = []
    for i, line in enumerate(body):
        if "ragged-all-to-all-start(" not in line:
            continue
        var = line.split("=")[0].strip()
        for j in range(i + 1, len(body)):
            if "ragged-all-to-all-done(" in body[j] and re.search(
                rf"\({re.escape(var)}\b", body[j]
            ):
                mm = collections.Counter(chunk_of(x) for x in body[i + 1 : j] if is_matmul(x))
                chunk = chunk_of(line)
                other = mm["Br"] + mm["B"] if chunk == "F" else mm["F"]
                out.append(dict(chunk=chunk, span=j - i - 1, matmuls=mm, other=other))
                break
    return out


def report(text: str) -> None:
    for op in ("ragged-all-to-all(", "ragged-all-to-all-start(", "ragged-all-to-all-done(",
               "collective-permute-start(", "collective-permute-done("):  # fmt: skip
        print(f"{op.rstrip('(')}: {text.count(op)}")
    for name, body in computations(text).items():
        if not any(e in line for line in body for e in EXCHANGE):
            continue
        print(f"tick computation {name} ({len(body)} instructions):")
        print(runs(tick_order(body)))
        pairs = async_exchanges(body)
        for k, p in enumerate(pairs):
            mm = " ".join(f"{c}x{p['matmuls'][c]}" for c in ("F", "Br", "B") if p["matmuls"][c])
            print(f"  exchange {k:2d} of chunk {p['chunk']:2s}: start..done spans {p['span']:4d} "
                  f"instructions, matmuls inside: {mm or 'none'}; of the other chunk: "
                  f"{p['other']}")  # fmt: skip
        if pairs:
            hidden = sum(p["other"] > 0 for p in pairs)
            print(f"  {hidden} of {len(pairs)} async exchanges have the other chunk's matmuls "
                  f"between start and done")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--schedule", default="dualpipe")
    p.add_argument("--topology", default="v5p:2x2x2")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--async_exchange", default="true", choices=("true", "false"))
    p.add_argument("--attention", default="reference", help="model.attention_impl (auto: splash)")
    p.add_argument("--dump", default="", help="write the optimized HLO text here")
    a = p.parse_args()
    text, memory = compile_step(
        a.schedule, a.topology, a.layers, a.async_exchange == "true", a.attention
    )
    if a.dump:
        Path(a.dump).write_text(text)
    if memory is not None:
        print(f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB per chip")
    report(text)


if __name__ == "__main__":
    main()
