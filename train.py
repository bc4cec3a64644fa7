"""Train a DeepSeek-V3-style model: `python train.py --config=configs/small.py [--workdir=DIR]`.

Config overrides: `--config.train.steps=200 --config.mesh.expert=2 ...`. Rerunning the same command
resumes from the latest checkpoint in the work directory (default `runs/<config name>`).
Multi-host: launch one process per host with `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (or let `jax.distributed.initialize()` detect the cluster with
`--distributed`).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Work directory (default: runs/<config name>).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detected).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: coordinator HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
    logging.getLogger("dsjax").setLevel(logging.INFO)
    import jax

    if FLAGS.coordinator_address or FLAGS.distributed:
        # Cross-process collectives for CPU devices (harmless where accelerators do the work).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    from dsjax import train_lib

    try:
        config = FLAGS.config
        config.keys()  # config_flags loads the file lazily: fail here, in one line
    except OSError as e:  # config_flags loads the file lazily
        print(f"error: cannot load --config: {str(e).splitlines()[-1].strip()}", file=sys.stderr)
        sys.exit(2)
    workdir = FLAGS.workdir or os.path.join("runs", config.get("name", "run"))
    try:
        summary = train_lib.train_and_evaluate(config, workdir)
    except (ValueError, FileNotFoundError, ImportError, train_lib.TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Every process reports the loss it computed (they must agree); the chief adds the rest.
    print(
        f"done: step {summary['step']}, loss {summary['loss']:.6f}, "
        f"eval loss {summary['eval_loss']:.6f}"
    )
    if jax.process_index() == 0:
        rate = summary.get("tokens_per_sec")
        print(
            f"{summary['wall_seconds']:.0f}s"
            + (f", {rate:.0f} tokens/s" if rate else "")
            + (f", MFU {summary['mfu']:.1%}" if summary.get("mfu") else "")
            + f" (peak FLOP/s: {summary['peak_flops_source']})"
        )
        if summary.get("sample"):
            print("sample:\n" + summary["sample"])
        print(f"work directory: {os.path.abspath(workdir)}")


def parse_flags(argv):
    """absl flag parsing, but a bad flag or config key is one line on stderr and exit code 2."""
    try:
        return FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections reports a misspelled key as a repr'd multi-line KeyError.
        text = str(e)[1:-1] if isinstance(e, KeyError | AttributeError) else str(e)
        text = text.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
