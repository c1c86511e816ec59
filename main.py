"""agre-jax: group-robust ensemble knowledge distillation.

    python main.py --config configs/multilayer_c.py [--workdir DIR] [--config.key=value ...]
    python main.py --config configs/multilayer_c.py:waterbirds --config.data.manual_dir=DIR

Runs (or resumes) every stage of one configuration and writes results.json / results.md in
the workdir. Bad input (config, data folder, checkpoints) exits with status 2 and a message.
A sweep config (configs/sweeps/*.py, with a `sweep` field) runs every variant x seed instead
and writes the aggregated report (agre_jax/sweep.py); a failed run there exits with 1.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:dataset]).", lock_config=True
)
flags.DEFINE_string("workdir", "", "Run directory (default: runs/<config file name>).")
flags.DEFINE_bool("overwrite", False, "Replace the results of a workdir made with another config.")
flags.mark_flags_as_required(["config"])

EXIT_BAD_INPUT = 2


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Heavy imports after flag parsing so that --help is instant; TF hides GPUs on import.
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    from agre_jax import loop, sweep, train, workdir
    from agre_jax.data import core

    config = FLAGS.config
    run_dir = FLAGS.workdir or f"runs/{_config_name()}"
    try:
        if "sweep" in config:
            return sweep.run_sweep(config, run_dir, FLAGS.overwrite, _config_path())["exit_code"]
        train.train_and_evaluate(config, run_dir, overwrite=FLAGS.overwrite)
    except (train.ConfigError, core.DataError, workdir.ConfigMismatchError, sweep.SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except loop.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _config_path() -> str:
    return getattr(FLAGS["config"], "config_filename", "") or ""


def _config_name() -> str:
    path = FLAGS["config"].config_filename if hasattr(FLAGS["config"], "config_filename") else ""
    path = path or "run"
    return path.split("/")[-1].split(":")[0].removesuffix(".py") + (
        "_" + path.split(":")[1] if ":" in path else ""
    )


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
