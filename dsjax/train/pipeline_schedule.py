"""Pipeline schedules as data: GPipe, 1F1B and DualPipe (V-shaped), and a simulator (SPEC §13).

A schedule is each rank's ordered list of cells. A cell is what one rank runs at once: a forward
chunk `F`, a backward chunk `B`, a weight-gradient chunk `W` (zero-bubble split, simulator only),
or an overlapped `F&B` pair (the forward of one micro-batch with the backward of another).
The model's layer stack is cut into `chunks` contiguous pieces; `chunk_rank[c]` holds chunk c:
GPipe/1F1B: N chunks, chunk c on rank c. DualPipe: 2N chunks, rank r holds chunks r and 2N-1-r
(DeepSeek's DualPipeV, the "cut-in-half" DualPipe: micro-batches go down the ranks through
chunks 0..N-1 and come back up through N..2N-1, so embedding and loss are both on rank 0).

`simulate` runs the cells with durations (F, B, W, F&B) respecting the data dependencies
(F(m,c) after F(m,c-1); B(m,c) after B(m,c+1) and F(m,c); W after its B) and gives the bubble
(idle time) and the peak activation memory per rank, in micro-batch chunk inputs held between a
chunk's forward and its backward. `ticks` turns a schedule into the lockstep table the SPMD
implementation (dsjax/train/pipeline.py) scans over: at each tick every rank runs at most one
forward and one backward chunk, then activations and gradients move one rank by ppermute.
"""

from __future__ import annotations

import dataclasses
from collections import deque

SCHEDULES = ("gpipe", "1f1b", "dualpipe")


@dataclasses.dataclass(frozen=True)
class Op:
    """One chunk of work: kind "F" (forward), "B" (backward; with `split` its weight-gradient part
    is deferred to a later "W"), or "W"; `mb` the micro-batch, `chunk` the model chunk."""

    kind: str
    mb: int
    chunk: int
    split: bool = False


Cell = tuple[Op, ...]  # (F,), (B,), (W,) or (F, B): an overlapped F&B pair


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    ranks: int
    microbatches: int
    chunk_rank: tuple[int, ...]  # rank holding each model chunk
    cells: tuple[tuple[Cell, ...], ...]  # per rank, in execution order

    @property
    def chunks(self) -> int:
        return len(self.chunk_rank)

    def rank_chunks(self, rank: int) -> tuple[int, ...]:
        """The model chunks `rank` holds, in local-slot order."""
        return tuple(c for c, r in enumerate(self.chunk_rank) if r == rank)


def _check(name: str, ranks: int, microbatches: int) -> None:
    if ranks < 1 or microbatches < 1:
        raise ValueError(f"{name}: ranks={ranks} and microbatches={microbatches} must be >= 1")


def gpipe(ranks: int, microbatches: int) -> Schedule:
    """All forwards, then all backwards (in reverse micro-batch order)."""
    _check("gpipe", ranks, microbatches)
    cells = tuple(
        tuple((Op("F", m, r),) for m in range(microbatches))
        + tuple((Op("B", m, r),) for m in reversed(range(microbatches)))
        for r in range(ranks)
    )
    return Schedule("gpipe", ranks, microbatches, tuple(range(ranks)), cells)


def one_f_one_b(ranks: int, microbatches: int) -> Schedule:
    """PipeDream-flush 1F1B: rank r warms up with N-1-r forwards, then alternates F and B."""
    _check("1f1b", ranks, microbatches)
    cells = []
    for r in range(ranks):
        warm = min(ranks - 1 - r, microbatches)
        out: list[Cell] = [(Op("F", m, r),) for m in range(warm)]
        f, b = warm, 0
        while b < microbatches:
            if f < microbatches:
                out.append((Op("F", f, r),))
                f += 1
            out.append((Op("B", b, r),))
            b += 1
        cells.append(tuple(out))
    return Schedule("1f1b", ranks, microbatches, tuple(range(ranks)), tuple(cells))


def dualpipe(ranks: int, microbatches: int, zero_bubble: bool = True) -> Schedule:
    """DualPipeV on `ranks` ranks (2·ranks chunks), cell for cell as deepseek-ai/DualPipe's
    `dualpipev.py` step(): nF0, nF0F1, nB1W1F1, nF0B1F1B0, nB1F1B0, nB1B0, nWB0, nW.

    Phase 0 on rank r is model chunk r, phase 1 is chunk 2N-1-r. `zero_bubble=False` runs every
    backward whole (no deferred W cells): the form the SPMD implementation runs, whose backward
    is one VJP.

    Simulated bubble (worst rank) with W=0: the README's (PP/2-1)(F&B+B-3W), PP = 2·ranks, exactly
    when F = B, and B-F below it when F < B. With the zero-bubble cells (W > 0) this cell order
    simulates to more than the formula (e.g. ranks 4, F=B=2, W=1, F&B=4: 12 vs 9)."""
    _check("dualpipe", ranks, microbatches)
    n = ranks
    if microbatches < 2 * n:
        raise ValueError(f"dualpipe: microbatches={microbatches} must be >= 2 x ranks={2 * n}")
    cells = [_dualpipe_rank(n, r, microbatches, zero_bubble) for r in range(n)]
    chunk_rank = tuple(c if c < n else 2 * n - 1 - c for c in range(2 * n))
    return Schedule("dualpipe", n, microbatches, chunk_rank, tuple(cells))


def _dualpipe_rank(n: int, r: int, microbatches: int, zero_bubble: bool) -> tuple[Cell, ...]:
    """Rank r's cells of `dualpipe`."""
    chunk = (r, 2 * n - 1 - r)
    f_next, b_next = [0, 0], [0, 0]
    out: list[Cell] = []
    w_queue: deque[Op] = deque()

    def fwd(p: int) -> Op:
        op = Op("F", f_next[p], chunk[p])
        f_next[p] += 1
        return op

    def bwd(p: int, zb: bool = False) -> Op:
        zb = zb and zero_bubble
        op = Op("B", b_next[p], chunk[p], split=zb)
        b_next[p] += 1
        if zb:
            w_queue.append(Op("W", op.mb, op.chunk))
        return op

    def weight() -> None:
        if w_queue:
            out.append((w_queue.popleft(),))

    for _ in range((n - r - 1) * 2):  # 1: nF0
        out.append((fwd(0),))
    for _ in range(r + 1):  # 2: nF0F1
        out.append((fwd(0),))
        out.append((fwd(1),))
    for _ in range(n - r - 1):  # 3: nB1W1F1
        out.append((bwd(1, zb=True),))
        weight()
        out.append((fwd(1),))
    for i in range(microbatches - 2 * n + r + 1):  # 4: nF0B1F1B0
        if i == 0 and r == n - 1:  # not overlapped on the last rank (F0 feeds F1 there)
            out.append((fwd(0),))
            out.append((bwd(1),))
        else:
            out.append((fwd(0), bwd(1)))
        out.append((fwd(1), bwd(0)))
    for _ in range(n - r - 1):  # 5: nB1F1B0
        out.append((bwd(1),))
        out.append((fwd(1), bwd(0)))
    zb = False
    for i in range(r + 1):  # 6: nB1B0, the second half zero-bubble
        if i == (r + 1) // 2 and r % 2 == 1:
            zb = True
        out.append((bwd(1, zb),))
        if i == (r + 1) // 2 and r % 2 == 0:
            zb = True
        out.append((bwd(0, zb),))
    for _ in range(n - r - 1):  # 7: nWB0
        weight()
        out.append((bwd(0, zb=True),))
    while w_queue:  # 8: nW
        weight()
    return tuple(out)


def make_schedule(name: str, ranks: int, microbatches: int, zero_bubble: bool = False) -> Schedule:
    if name == "gpipe":
        return gpipe(ranks, microbatches)
    if name == "1f1b":
        return one_f_one_b(ranks, microbatches)
    if name == "dualpipe":
        return dualpipe(ranks, microbatches, zero_bubble)
    raise ValueError(f"pipeline schedule {name!r} must be one of {SCHEDULES}")


# ----------------------------------------------------------------------------- simulation
@dataclasses.dataclass(frozen=True)
class Simulation:
    makespan: float
    busy: tuple[float, ...]  # per rank
    peak_activations: tuple[int, ...]  # per rank, in micro-batch chunk inputs

    @property
    def bubble(self) -> tuple[float, ...]:
        """Idle time per rank within the step."""
        return tuple(self.makespan - b for b in self.busy)

    @property
    def bubble_fraction(self) -> float:
        """Idle fraction of all ranks' time."""
        return 1.0 - sum(self.busy) / (self.makespan * len(self.busy))


def _deps(op: Op, chunks: int) -> list[tuple[str, int, int]]:
    if op.kind == "F":
        return [("F", op.mb, op.chunk - 1)] if op.chunk else []
    if op.kind == "B":
        deps = [("F", op.mb, op.chunk)]
        return deps + ([("B", op.mb, op.chunk + 1)] if op.chunk + 1 < chunks else [])
    return [("B", op.mb, op.chunk)]


def simulate(
    s: Schedule, f: float = 1.0, b: float = 2.0, w: float = 0.0, fb: float | None = None
) -> Simulation:
    """Event times of `s` with chunk durations F=f, B=b (whole backward, W=w of it), F&B=fb
    (default f+b); transfers are free. Raises if the cell orders deadlock."""
    fb = f + b if fb is None else fb

    def duration(cell: Cell) -> float:
        if len(cell) == 2:
            return fb - sum(w for op in cell if op.split)
        op = cell[0]
        return {"F": f, "B": b - (w if op.split else 0.0), "W": w}[op.kind]

    done: dict[tuple[str, int, int], float] = {}
    pos = [0] * s.ranks
    clock = [0.0] * s.ranks
    busy = [0.0] * s.ranks
    held = [0] * s.ranks
    peak = [0] * s.ranks
    remaining = sum(len(c) for c in s.cells)
    while remaining:
        progressed = False
        for r in range(s.ranks):
            while pos[r] < len(s.cells[r]):
                cell = s.cells[r][pos[r]]
                deps = [d for op in cell for d in _deps(op, s.chunks)]
                if any(d not in done for d in deps):
                    break
                start = max([clock[r], *(done[d] for d in deps)])
                end = start + duration(cell)
                for op in cell:
                    done[(op.kind, op.mb, op.chunk)] = end
                    held[r] += {"F": 1, "B": -1, "W": 0}[op.kind]
                    peak[r] = max(peak[r], held[r])
                clock[r], busy[r] = end, busy[r] + duration(cell)
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: s.cells[r][pos[r]] for r in range(s.ranks) if pos[r] < len(s.cells[r])}
            raise ValueError(f"{s.name}: schedule deadlocks at {stuck}")
    return Simulation(max(clock), tuple(busy), tuple(peak))


# ----------------------------------------------------------------------------- lockstep ticks
@dataclasses.dataclass(frozen=True)
class TickTable:
    """The lockstep form of a schedule (no W cells). Per tick t and rank r:
    `fwd[t][r]` = (micro-batch, chunk) or None, `bwd[t][r]` likewise; a rank's forward and
    backward in one tick are an F&B pair. Each chunk's input waits in an activation slot of its
    rank from its forward to its backward: `slot[(mb, chunk)]`, `slots` per rank."""

    schedule: Schedule
    fwd: tuple[tuple[tuple[int, int] | None, ...], ...]
    bwd: tuple[tuple[tuple[int, int] | None, ...], ...]
    slot: dict[tuple[int, int], int]
    slots: int

    @property
    def length(self) -> int:
        return len(self.fwd)


def ticks(s: Schedule) -> TickTable:
    """Each rank runs its next cell at the first tick at which its inputs arrived (sent at the
    end of an earlier tick); ranks wait otherwise. A chunk that feeds a chunk on the same rank
    (DualPipe's turn on the last rank) is available at the next tick too."""
    if any(op.kind == "W" or op.split for cells in s.cells for c in cells for op in c):
        raise ValueError(f"{s.name}: the lockstep table takes schedules without W cells")
    done: set[tuple[str, int, int]] = set()
    pos = [0] * s.ranks
    fwd: list[tuple[tuple[int, int] | None, ...]] = []
    bwd: list[tuple[tuple[int, int] | None, ...]] = []
    while any(p < len(c) for p, c in zip(pos, s.cells, strict=True)):
        f_row: list[tuple[int, int] | None] = [None] * s.ranks
        b_row: list[tuple[int, int] | None] = [None] * s.ranks
        finished = []
        for r in range(s.ranks):
            if pos[r] == len(s.cells[r]):
                continue
            cell = s.cells[r][pos[r]]
            if all(d in done for op in cell for d in _deps(op, s.chunks)):
                for op in cell:
                    row = f_row if op.kind == "F" else b_row
                    row[r] = (op.mb, op.chunk)
                    finished.append((op.kind, op.mb, op.chunk))
                pos[r] += 1
        if not finished:
            raise ValueError(f"{s.name}: lockstep schedule deadlocks")
        done.update(finished)
        fwd.append(tuple(f_row))
        bwd.append(tuple(b_row))
    slot, slots = _activation_slots(s, fwd, bwd)
    return TickTable(s, tuple(fwd), tuple(bwd), slot, slots)


def _activation_slots(s: Schedule, fwd, bwd) -> tuple[dict[tuple[int, int], int], int]:
    """Slot of each (mb, chunk) input on its rank: taken at its forward tick, freed after its
    backward tick (a slot freed by a backward is reusable by a forward of a later tick)."""
    free: list[list[int]] = [[] for _ in range(s.ranks)]
    used = [0] * s.ranks
    slot: dict[tuple[int, int], int] = {}
    for f_row, b_row in zip(fwd, bwd, strict=True):
        for r in range(s.ranks):
            if f_row[r] is not None:
                if free[r]:
                    slot[f_row[r]] = free[r].pop()
                else:
                    slot[f_row[r]] = used[r]
                    used[r] += 1
        for r in range(s.ranks):
            if b_row[r] is not None:
                free[r].append(slot[b_row[r]])
    return slot, max(used)


def pipeline_figures(name: str, ranks: int, microbatches: int, microbatch_bytes: float) -> dict:
    """The planner's pipeline figures: lockstep ticks, bubble fraction (simulated with B = 3F:
    dsjax's backward chunk recomputes its forward), peak activation memory of the worst rank
    (chunk inputs, x `microbatch_bytes` = one micro-batch's [b, T, D] activations per chip), and
    the stage-to-stage bytes of one step per chip (forward activations and input gradients over
    every chunk boundary between two ranks: over DCN when stages are TPU slices)."""
    s = make_schedule(name, ranks, microbatches)
    sim = simulate(s, 1.0, 3.0)
    crossings = sum(s.chunk_rank[c] != s.chunk_rank[c + 1] for c in range(s.chunks - 1))
    peak = max(sim.peak_activations)
    return {
        "schedule": name,
        "stages": ranks,
        "microbatches": microbatches,
        "chunks": s.chunks,
        "ticks": ticks(s).length,
        "bubble_fraction": sim.bubble_fraction,
        "peak_activations": peak,
        "activation_bytes": peak * microbatch_bytes,
        "stage_transfer_bytes": 2 * crossings * microbatches * microbatch_bytes,
    }
