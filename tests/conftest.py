"""Test setup: 8 fake CPU devices (set before JAX is imported), the repo root on sys.path, and
the fixtures several test files share. Shared helpers (tiny configs, random variables,
references) are in `dsjax.testing`."""

import os
import sys

# Tiny test programs spend far longer in XLA:CPU's LLVM optimisation than in running, so tests
# compile with it turned down (results are checked against references with tolerances, and the
# bit-exact comparisons compare runs made under the same flags).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    # 8 fake devices share CI's 2 cores with a second xdist worker and train.py subprocesses:
    # a collective's participants can then arrive far apart, and XLA:CPU aborts the whole
    # process when a rendezvous outlasts its termination timeout. Wait instead.
    + " --xla_cpu_collective_timeout_seconds=900"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    + " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
    # XLA:CPU (jax 0.10.2) with the concurrency-optimised scheduler sometimes deadlocks a step
    # whose independent collectives the 8 fake devices then issue in different orders: a gdb
    # dump of a hung test_dense_config_trains_with_bf16_moments_and_chunked_ce showed devices
    # parked in InProcessCommunicator::AllToAll while the others waited in ::AllGather (about
    # 1 in 5 cold runs under load). With it off: 8 of 8 cold runs under load passed.
    + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tempfile  # noqa: E402

# Tests compile the same tiny programs many times over (also in the train.py subprocesses they
# start, which inherit this environment); a persistent cache in the temp dir lets later tests
# reuse them. It stores compiled code, not results.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dsjax-xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

# ...but not in the test processes themselves: serialising a freshly compiled executable for the
# cache (`LoadedExecutable.serialize`, XLA:CPU, jax 0.10.2) segfaulted an xdist worker once
# (tests/v4_test.py, after hundreds of programs in that process; the same test alone passes).
# Within one process jit's own cache already shares programs; the train.py subprocesses the
# tests start keep the persistent cache through the environment above.
jax.config.update("jax_enable_compilation_cache", False)


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test file, drop jit's caches. Every compiled XLA:CPU executable keeps memory
    mappings alive; a worker that runs many files otherwise accumulates them (44,117 maps seen
    in one worker, against the kernel's default vm.max_map_count of 65,530) until an mmap fails
    inside a compile and the process aborts ("Fatal Python error: Aborted" in
    backend_compile_and_load). Files share programs through their own module fixtures, which
    this runs after (it is set up first, so torn down last)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """configs/tiny.py's BPE, trained once per test process (train and train-CLI runs load it)."""
    from configs import tiny
    from dsjax.train import data

    workdir = tmp_path_factory.mktemp("tok")
    data.get_tokenizer(tiny.get_config(), str(workdir))
    return str(workdir / "tokenizer")


# ----------------------------------------------------------------------------- xdist scheduling
# The suite is compile-bound and its files share compiled programs through module fixtures. Under
# xdist's default `--dist load` the tests of one file are dealt out to both workers, so each
# worker compiles the file's fixtures again; whole files per worker (`loadfile`) compile them
# once. The slowest files go first, so that no long file starts last and leaves
# the other worker idle (xdist hands each worker its next file as it finishes one); the rest
# keep their collection order.
SLOWEST_FIRST = (  # CPU-s (user+sys), each file alone on the shared 2-core machine; * = wall/1.5
    "train_test.py",  # 443 (cold persistent cache)
    "pipeline_test.py",  # ~200 (in a -n 2 run)
    "v4_decode_test.py",  # ~150*
    "grpo_test.py",  # 104
    "v4_context_test.py",  # ~100*
    "fp8_test.py",  # 99
    "v4_train_test.py",  # ~95*
    "serve_test.py",  # 76
    "v4_engine_test.py",  # ~65*
    "v4_test.py",  # by guess; measured below 40: dsa_test 39, hf_test 24 (collection order)
    "engine_test.py",
    "decode_mesh_test.py",
    "moe_parallel_test.py",
    "train_cli_test.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown when it is not installed
def pytest_xdist_make_scheduler(config, log):
    """`-n N` (xdist's default `--dist load`) schedules whole files (see above); an explicit
    other `--dist` mode is left as asked."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # keep SLOWEST_FIRST's order, not tests per file
    return LoadFileScheduling(config, log)
