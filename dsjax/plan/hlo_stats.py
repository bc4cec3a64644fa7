"""Collectives in an optimized HLO module (`compiled.as_text()`), with bytes per step.

Ops inside a `while` body (the scanned layer stacks, gradient accumulation) run once per
iteration: each computation's multiplicity is propagated from ENTRY through call sites, using
the `known_trip_count` XLA attaches to while loops whose trip count it knows (else 1: then the
figure is a lower bound and `unknown_trip_counts` says so). XLA:TPU's text carries no
`known_trip_count`; there the bound is read from the loop condition (`i < N`, a scan's form).
"""

from __future__ import annotations

import collections
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


def _multiplicities(comps, entry) -> tuple[dict[str, float], int]:
    """Times each computation runs per execution of ENTRY (callees precede callers in text)."""
    bounds = _condition_bounds(comps)
    mult: dict[str, float] = collections.defaultdict(float)
    if entry is None:
        return {name: 1.0 for name, _ in comps}, 0
    mult[entry] = 1.0
    unknown = 0
    for name, lines in reversed(comps):
        m = mult.get(name, 0.0)
        if not m:
            continue
        for line in lines:
            is_while = " while(" in line
            trip = None
            if is_while:
                found = _TRIP.search(line)
                cond = _CONDITION.search(line)
                trip = int(found.group(1)) if found else bounds.get(cond.group(1) if cond else "")
                unknown += trip is None
            for kind, callee in _CALLEE.findall(line):
                factor = trip if (trip is not None and kind == "body") else 1
                mult[callee] += m * factor
            for group in _BRANCHES.findall(line):
                for callee in group.split(","):
                    mult[callee.strip().lstrip("%")] += m
    return mult, unknown


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


def collectives(hlo: str, num_devices: int, per_slice: int | None = None) -> dict:
    """{op: {"count", "result_bytes", "moved_bytes"}} per step, plus `unknown_trip_counts`.
    With `per_slice` (devices per slice of a multi-slice target) each op also has
    "dcn_bytes": what one device sends between slices (`_dcn_bytes`)."""
    comps, entry = _split_computations(hlo)
    mult, unknown = _multiplicities(comps, entry)
    stats = {op: {"count": 0, "result_bytes": 0.0, "moved_bytes": 0.0} for op in COLLECTIVES}
    if per_slice:
        for v in stats.values():
            v["dcn_bytes"] = 0.0
    for name, lines in comps:
        m = mult.get(name, 0.0)
        if not m:
            continue
        for line in lines:
            if per_slice and (dcn := _megascale_send(line, num_devices // per_slice)):
                op, size, sent = dcn
                stats[op]["count"] += int(m)
                stats[op]["result_bytes"] += m * size
                stats[op]["moved_bytes"] += m * sent
                stats[op]["dcn_bytes"] += m * sent
                continue
            found = _OP.search(line)
            if not found:
                continue
            result, op, start = found.group(1), found.group(2), found.group(3)
            sizes = shape_bytes(result)
            if not sizes:
                continue
            # An async '-start' returns a tuple (operands, results, context): take the largest.
            size = max(sizes) if start else sum(sizes)
            n = _group_size(line, num_devices)
            stats[op]["count"] += int(m)
            stats[op]["result_bytes"] += m * size
            stats[op]["moved_bytes"] += m * _moved_bytes(op, size, n)
            if per_slice:
                stats[op]["dcn_bytes"] += m * _dcn_bytes(op, line, size, num_devices, per_slice)
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
