"""Does XLA:TPU overlap a DualPipe tick's expert all-to-alls with the other chunk's matmuls?

Compiles the real train step (`dsjax.train.step.train_step`, pipelined over `stage`) for abstract
TPU v5p chips with the planner's target (libtpu, no TPU needed) and prints, for the scheduled
HLO computation of one pipeline tick (the scan body holding the ragged all-to-alls), the order of
its matmuls and all-to-alls labelled by the chunk they belong to: F (the forward chunk), Brecompute
(the backward chunk's recomputed forward) and B (its transpose), compressed into runs.

    python benchmarks/pipeline_overlap_hlo.py [--schedule=dualpipe] [--topology=v5p:2x2x2]

A small MoE (hidden 512, 64 experts of width 512, so that the experts' token exchange is chosen
over gathering their weights), 4 MoE layers, bf16, reference attention (see RESULTS for why).
"""

from __future__ import annotations

import argparse
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


def compile_step(schedule: str, topology: str) -> str:
    c = get_config()
    c.model.update(num_hidden_layers=5, dtype="bfloat16", attention_impl="reference",
                   hidden_size=512, moe_intermediate_size=512, n_routed_experts=64)  # fmt: skip
    c.mesh.update(stage=2, data=1, expert=4)
    c.train.update(pipeline_schedule=schedule, microbatches=4, batch_size=16)
    c.data.seq_len = 256
    target = planner.make_target(topology)
    mesh = sharding.make_mesh(**c.mesh, devices=list(target.devices))
    model, (tx, lr) = Transformer(ts.model_config(c)), ts.make_optimizer(c)
    abstract, shardings = ts.state_shardings(model, tx, mesh, c.data.seq_len)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        step = ts.jit_train_step(
            model, tx, lr, c, shardings=shardings, mesh=mesh, donate=False
        )
        batch = planner._batch_abstract(mesh, c.train.batch_size, c.data.seq_len)
        text = step.lower(abstract, batch).compile().as_text()
    print(f"compiled for {topology} in {time.perf_counter() - t0:.0f}s")
    return text


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


def tick_order(body: list[str]) -> list[tuple[str, str]]:
    """(what, chunk) per matmul / all-to-all / ppermute start, in schedule order."""
    seq = []
    for line in body:
        op = re.search(r'op_name="([^"]*)"', line)
        name = op.group(1) if op else ""
        side = "B" if "transpose(jvp())" in name else ("Brecompute" if "jvp()" in name else "F")
        if "ragged-all-to-all(" in line or "all-to-all-start" in line:
            seq.append(("A2A", side))
        elif "convolution" in line or "dot_general" in name:
            seq.append(("mm", side))
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--schedule", default="dualpipe")
    p.add_argument("--topology", default="v5p:2x2x2")
    a = p.parse_args()
    text = compile_step(a.schedule, a.topology)
    for op in ("ragged-all-to-all(", "all-to-all-start", "all-to-all-done",
               "collective-permute-start", "collective-permute-done"):  # fmt: skip
        print(f"{op.rstrip('(')}: {text.count(op)}")
    for name, body in computations(text).items():
        if any("ragged-all-to-all(" in line for line in body):
            print(f"tick computation {name} ({len(body)} instructions):")
            print(runs(tick_order(body)))


if __name__ == "__main__":
    main()
