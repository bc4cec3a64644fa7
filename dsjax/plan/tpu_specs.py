"""Published per-chip figures of Cloud TPU generations, and topology-name parsing for the planner.

Sources (Cloud TPU system-architecture pages, read 2025):
  v4   https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2, 1,200 GB/s HBM,
                                               ICI 2,400 Gbps per chip (= 300 GB/s)
  v5e  https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s HBM,
                                               ICI 1,600 Gbps per chip (= 200 GB/s)
  v5p  https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GiB HBM2e, 2,765 GB/s HBM,
                                               ICI 4,800 Gbps per chip (= 600 GB/s)
  v6e  https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GiB HBM, 1,640 GB/s HBM,
                                               ICI 3,584 Gbps per chip (= 448 GB/s)
Host memory per chip (what `optim.host_offload` and remat "offload" use): the TPU VM's DRAM over
its chips, from the same pages (read 2026): v5e 512 GiB per 8-chip host, v5p 448 GB per 4-chip
VM, v6e 1,536 GiB per 8-chip host; v4's is not given there (None: not checked).
Data-center network (DCN, between the slices of a multi-slice job) per chip, same pages (read
2026): v5p 50 Gbps per chip; v5e 6.4 Tbps per 256-chip pod (25 Gbps per chip); v4 and v6e's are
not given there (None: no DCN time is estimated).
HBM capacity is what XLA:TPU itself reports as available (v5p: "available HBM (95.74G)", v5e:
15.75G, v6e: 31.25G; G = GiB);
where the compiler has not been seen to say, the nominal size. libtpu exposes v4 as one JAX device
per TensorCore (2 per chip); v5e, v5p (megacore) and v6e as one device per chip. The planner
divides a chip's figures by its devices.
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str
    peak_bf16_flops: float  # per chip, dense
    hbm_bytes: float  # per chip
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # per chip, all links together
    dims: int  # 3 for 3-D tori (v4, v5p), 2 for v5e / v6e
    host_bytes: float | None = None  # host DRAM per chip
    dcn_bytes_per_s: float | None = None  # data-center network (between slices) per chip


CHIPS = {
    "v4": ChipSpec("v4", 275e12, 32 * GIB, 1200e9, 300e9, 3),
    "v5e": ChipSpec("v5e", 197e12, 15.75 * GIB, 819e9, 200e9, 2, 512 * GIB / 8, 6.4e12 / 8 / 256),
    "v5p": ChipSpec("v5p", 459e12, 95.74 * GIB, 2765e9, 600e9, 3, 448e9 / 4, 50e9 / 8),
    "v6e": ChipSpec("v6e", 918e12, 31.25 * GIB, 1640e9, 448e9, 2, 1536 * GIB / 8),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e|v5litepod|v5lite|v6|v5):(\d+(?:x\d+){1,2})$")


def parse_topology(name: str) -> tuple[ChipSpec, tuple[int, ...]]:
    """`v5p:4x8x8` -> (spec, (4, 8, 8)). Raises ValueError naming the accepted forms."""
    m = _TOPOLOGY.match(name.strip().lower())
    if not m:
        raise ValueError(
            f"--topology={name!r}: expected <generation>:<AxB> or <AxBxC> with generation one of "
            f"{sorted(CHIPS)} (e.g. v5p:4x8x8 = 256 chips, v5e:2x2, v6e:4x4, v4:2x2x1)"
        )
    spec = CHIPS[ALIASES.get(m.group(1), m.group(1))]
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if len(dims) != spec.dims:
        raise ValueError(
            f"--topology={name!r}: {spec.name} topologies have {spec.dims} dimensions "
            f"(e.g. {'4x4x4' if spec.dims == 3 else '4x4'})"
        )
    if any(d < 1 for d in dims):
        raise ValueError(f"--topology={name!r}: every dimension must be >= 1")
    return spec, dims


def libtpu_topology_name(spec: ChipSpec, dims: tuple[int, ...]) -> str:
    """The name `jax.experimental.topologies.get_topology_desc` accepts (e.g. 'v5p:4x8x8')."""
    return f"{spec.name}:{'x'.join(map(str, dims))}"


def num_chips(dims: tuple[int, ...]) -> int:
    return math.prod(dims)
