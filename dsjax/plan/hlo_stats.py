"""Collectives in an optimized HLO module (`compiled.as_text()`), with bytes per step.

What one execution of ENTRY runs, computed bottom-up over the call graph: a computation costs
its own collectives plus its callees' costs — a `while` body times the loop's trip count (the
`known_trip_count` XLA attaches to loops whose count it knows; XLA:TPU's text carries none, so
there the bound is read from the loop condition, `i < N`, a scan's form; else 1: the figure is
then a lower bound and `unknown_trip_counts` says so), and a `conditional` ONE branch per
execution: the branch that moves the most bytes (an upper bound for the branch actually taken;
a pipeline's tick runs one of its switch's cases, not all of them).
"""

from __future__ import annotations

import re

COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
)
_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(|\{)")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRUE_FALSE = re.compile(r"\b(?:true|false)_computation=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_GROUPS_IOTA_FULL = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_GROUPS_ALL = re.compile(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{[0-9,]*\},?)*)\}")
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_CONST = re.compile(r"s32\[\]\S* constant\((\d+)\)")


def _dtype_bytes(dtype: str) -> float:
    if dtype.startswith("f8") or dtype.startswith("s8") or dtype.startswith("u8"):
        return 1
    return _DTYPE_BYTES.get(dtype, 0)


def shape_bytes(text: str) -> list[float]:
    """Bytes of every array shape written in `text` (e.g. '(bf16[8,16], f32[])')."""
    out = []
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(n * _dtype_bytes(dtype))
    return out


def _split_computations(hlo: str) -> tuple[list[tuple[str, list[str]]], str | None]:
    comps: list[tuple[str, list[str]]] = []
    entry: str | None = None
    current: tuple[str, list[str]] | None = None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            m = _HEADER.match(line)
            if m:
                current = (m.group(1), [])
                comps.append(current)
                if line.startswith("ENTRY"):
                    entry = m.group(1)
                continue
        if current is not None and line.startswith(" "):
            current[1].append(line)
    return comps, entry


def _condition_bounds(comps) -> dict[str, int]:
    """{condition computation: N} for conditions whose root is `counter < constant(N)`."""
    bounds = {}
    for name, lines in comps:
        root = next((ln for ln in lines if "ROOT" in ln), "")
        consts = [int(c) for ln in lines for c in _CONST.findall(ln)]
        if "compare(" in root and "direction=LT" in root and len(consts) == 1:
            bounds[name] = consts[0]
    return bounds


def _group_size(line: str, default: int) -> int:
    m = _GROUPS_MESH.search(line)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        names = re.findall(r"'([^']+)'", m.group(2))
        n = 1
        for name in names:
            n *= sizes.get(name, 1)
        return n
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST.search(line)
    if m:
        return max(1, len([x for x in m.group(1).split(",") if x]))
    return default


def _moved_bytes(op: str, size: float, n: int) -> float:
    """Bytes one device sends for a ring/torus implementation of `op` on `size`-byte results."""
    frac = (n - 1) / n if n > 1 else 0.0
    if op == "all-gather" or op in ("all-to-all", "ragged-all-to-all"):
        return size * frac
    if op == "reduce-scatter":
        return size * (n - 1)
    if op == "all-reduce":
        return 2 * size * frac
    return size  # collective-permute


def _groups(line: str, num_devices: int) -> list[list[int]] | None:
    """The replica groups of a collective as lists of device ids (the program's logical ids:
    positions in the mesh's device list), or None for a form not read here."""
    m = _GROUPS_IOTA_FULL.search(line)
    if m:
        import numpy as np

        g, size = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(g, size).tolist()
    m = _GROUPS_ALL.search(line)
    if m:
        groups = [
            [int(x) for x in grp.split(",") if x]
            for grp in re.findall(r"\{([0-9,]*)\}", m.group(1))
        ]
        return groups or [list(range(num_devices))]
    return None


def _dcn_bytes(op: str, line: str, size: float, num_devices: int, per_slice: int) -> float:
    """Bytes one device sends between slices (DCN) for `op` on `size`-byte results, when the
    devices of slice s are the mesh positions [s * per_slice, (s + 1) * per_slice): a
    collective-permute's pairs that cross, else the groups' members in other slices, with a
    hierarchical algorithm (reduce/gather inside a slice, one share per chip over DCN): for a
    group of K slices x m chips, all-reduce 2 S (K-1)/(K m), all-gather S (K-1)/(K m),
    reduce-scatter S (K-1), all-to-all S (n - m)/n. Unknown group forms count as crossing."""
    if op == "collective-permute":
        m = _PAIRS.search(line)
        if not m:
            return size
        pairs = [
            [int(x) for x in p.split(",") if x] for p in re.findall(r"\{([0-9,]*)\}", m.group(1))
        ]
        cross = [p for p in pairs if len(p) == 2 and p[0] // per_slice != p[1] // per_slice]
        # Every device sends at most once: the worst device's bytes.
        return size if cross else 0.0
    groups = _groups(line, num_devices)
    if groups is None:
        return _moved_bytes(op, size, num_devices)
    worst = 0.0
    for grp in groups:
        n = len(grp)
        slices = {d // per_slice for d in grp}
        K = len(slices)
        if K <= 1 or n <= 1:
            continue
        per = n / K  # the group's members in each slice
        if op == "all-reduce":
            b = 2 * size * (K - 1) / (K * per)
        elif op == "all-gather":
            b = size * (K - 1) / (K * per)
        elif op == "reduce-scatter":
            b = size * (K - 1)
        else:  # all-to-all, ragged-all-to-all
            b = size * (n - per) / n
        worst = max(worst, b)
    return worst


_MEGASCALE = re.compile(r'\bsend\(.*_xla_megascale_transfer_type="([A-Z_]+)"')


def _megascale_send(line: str, slices: int) -> tuple[str, float, float] | None:
    """(op, payload bytes, bytes sent over DCN) of a cross-slice transfer: XLA:TPU compiles a
    multi-slice program per slice, and what crosses slices leaves as a host-transfer `send` to
    its DCN runtime ("xla_megascale"): ONE_TO_ONE for a permute (the payload), ALL_REDUCE for
    the cross-slice part of an all-reduce (2 S (K-1)/K over K slices)."""
    m = _MEGASCALE.search(line)
    if not m:
        return None
    sizes = shape_bytes(line.split(" send(")[0])
    if not sizes:
        return None
    size = sizes[0]
    if m.group(1) == "ALL_REDUCE":
        return "all-reduce", size, 2 * size * (slices - 1) / slices
    return "collective-permute", size, size


_FIELDS = ("count", "result_bytes", "moved_bytes", "dcn_bytes")
Cost = dict[str, list[float]]  # op -> [count, result bytes, moved bytes, dcn bytes]


def _zero() -> Cost:
    return {op: [0.0] * len(_FIELDS) for op in COLLECTIVES}


def _add(total: Cost, part: Cost, times: float = 1.0) -> None:
    for op, v in part.items():
        t = total[op]
        for j, x in enumerate(v):
            t[j] += times * x


def _line_cost(line: str, num_devices: int, per_slice: int | None) -> tuple[str, list] | None:
    """(op, [1, result bytes, moved bytes, dcn bytes]) of one collective instruction."""
    if per_slice and (send := _megascale_send(line, num_devices // per_slice)):
        op, size, sent = send
        return op, [1, size, sent, sent]
    found = _OP.search(line)
    if not found:
        return None
    result, op, start = found.group(1), found.group(2), found.group(3)
    sizes = shape_bytes(result)
    if not sizes:
        return None
    # An async '-start' returns a tuple (operands, results, context): take the largest.
    size = max(sizes) if start else sum(sizes)
    moved = _moved_bytes(op, size, _group_size(line, num_devices))
    dcn = _dcn_bytes(op, line, size, num_devices, per_slice) if per_slice else 0.0
    return op, [1, size, moved, dcn]


def _costs(comps, entry, num_devices: int, per_slice: int | None) -> tuple[Cost, int]:
    """(what one execution of `entry` runs, loops of unknown trip count met)."""
    lines_of = dict(comps)
    bounds = _condition_bounds(comps)
    memo: dict[str, Cost] = {}
    unknown = 0

    def heaviest(branches: list[Cost]) -> Cost:
        def key(c: Cost):
            return tuple(sum(v[j] for v in c.values()) for j in (2, 3, 1, 0))

        return max(branches, key=key, default=_zero())

    def cost(name: str, stack: tuple[str, ...] = ()) -> Cost:
        nonlocal unknown
        if name in memo:
            return memo[name]
        total = _zero()
        if name in stack:  # not a call graph XLA emits; do not loop
            return total
        for line in lines_of.get(name, ()):
            if (own := _line_cost(line, num_devices, per_slice)) is not None:
                _add(total, {own[0]: own[1]})
            trip = None
            if " while(" in line:
                found, cond = _TRIP.search(line), _CONDITION.search(line)
                trip = int(found.group(1)) if found else bounds.get(cond.group(1) if cond else "")
                unknown += trip is None
            for kind, callee in _CALLEE.findall(line):
                times = trip if (trip is not None and kind == "body") else 1
                _add(total, cost(callee, (*stack, name)), times)
            branches = [
                c.strip().lstrip("%") for g in _BRANCHES.findall(line) for c in g.split(",")
            ]
            branches += _TRUE_FALSE.findall(line)
            if branches:
                _add(total, heaviest([cost(b, (*stack, name)) for b in branches if b]))
        memo[name] = total
        return total

    if entry is None:  # a fragment: every instruction once
        total = _zero()
        for _, lines in comps:
            for line in lines:
                if (own := _line_cost(line, num_devices, per_slice)) is not None:
                    _add(total, {own[0]: own[1]})
        return total, unknown
    return cost(entry), unknown


def collectives(hlo: str, num_devices: int, per_slice: int | None = None) -> dict:
    """{op: {"count", "result_bytes", "moved_bytes"}} per step, plus `unknown_trip_counts`.
    With `per_slice` (devices per slice of a multi-slice target) each op also has
    "dcn_bytes": what one device sends between slices (`_dcn_bytes`)."""
    comps, entry = _split_computations(hlo)
    total, unknown = _costs(comps, entry, num_devices, per_slice)
    fields = _FIELDS if per_slice else _FIELDS[:3]
    stats = {
        op: {f: (int(v[j]) if f == "count" else v[j]) for j, f in enumerate(_FIELDS) if f in fields}
        for op, v in total.items()
    }
    return {"ops": stats, "unknown_trip_counts": unknown}


def result_shapes(hlo: str, op: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dimensions) of the result of every `op` (e.g. "all-gather") in the module, each
    once however often it runs (an async start's largest array): what a test checks a
    collective moves (weights or activations)."""
    shapes = []
    for line in hlo.splitlines():
        found = _OP.search(line)
        if not found or found.group(2) != op:
            continue
        text = found.group(1)
        arrays = [
            (size, (dtype, tuple(int(d) for d in filter(None, dims.split(",")))))
            for size, (dtype, dims) in zip(shape_bytes(text), _SHAPE.findall(text), strict=True)
        ]
        if arrays:
            shapes.append(max(arrays)[1] if found.group(3) else arrays[-1][1])
    return shapes
