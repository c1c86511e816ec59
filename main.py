"""agre-jax: group-robust ensemble knowledge distillation.

    python main.py --config configs/multilayer_c.py [--workdir DIR] [--config.key=value ...]
    python main.py --config configs/multilayer_c.py:waterbirds --config.data.manual_dir=DIR

Runs (or resumes) every stage of one configuration and writes results.json / results.md in
the workdir. A sweep config (configs/sweeps/*.py, with a `sweep` field) runs every variant x
seed instead and writes the aggregated report (agre_jax/sweep_runner.py).

Exit status: 0 done; 2 bad input (flags, config, data folder, checkpoints, workdir), with one
message and before any training; 1 a failure during the run (a non-finite loss, a full disk,
a failed sweep run), with one message saying what a rerun does. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues, sys_argv: list[str] | None = None) -> None:
    """This program's flags. Tests define them on a fresh FlagValues per call, with the
    arguments as `sys_argv` (config_flags finds `--config.key=value` overrides there)."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file (configs/*.py[:dataset]).",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=sys_argv,
    )
    flags.DEFINE_string(
        "workdir",
        "",
        "Run directory (default: runs/<config file name>).",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace the results of a workdir made with another config.",
        flag_values=flag_values,
    )
    flags.mark_flags_as_required(["config"], flag_values=flag_values)


define_flags(FLAGS)

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")
# OS errors that a full disk or an unwritable place gives while a run writes its results.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """absl flag parsing with this program's exit codes: 2 and one line for a bad flag, a
    config file that does not load or an unknown config key; 0 for --help."""
    try:
        rest = flag_values(argv)
        _ = (
            "seed" in flag_values.config
        )  # config_flags defers a config file's load error to its use
        return rest
    except SystemExit as e:  # absl's help flags exit 1 after printing the usage
        if any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
            raise SystemExit(0) from e
        raise
    except (
        flags.Error,
        AttributeError,
        KeyError,
        TypeError,
        ValueError,
        OSError,
        SyntaxError,
        ImportError,
    ) as e:
        print(f"error: {_flag_message(e)}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from e


def _flag_message(e: BaseException) -> str:
    """One paragraph from a flag-parsing error (config_flags wraps the config's own error)."""
    text = str(e.args[0]) if isinstance(e, KeyError | AttributeError) and e.args else str(e)
    text = text.replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(e, AttributeError | KeyError):  # ml_collections quotes the key
        lines = [line.strip("'\"") for line in lines]
    if "Traceback (most recent call last):" in text:  # a config file raised: keep its error
        head = lines[0].split("Traceback")[0].strip()
        text = f"{head} {lines[-1]}"
    elif isinstance(e, OSError) and "Attempted" in text:
        text = f"cannot load the config file: {' '.join(lines[-1:])}"
    else:
        text = " ".join(lines)
    if isinstance(e, SyntaxError | ImportError):
        return f"cannot load the config file: {type(e).__name__}: {e}"
    if "has no attribute 'get_config" in text:
        return "the config file defines no get_config(); expected def get_config(arg=None)"
    if text.startswith("Unknown command line flag 'config."):
        key = text.split("'")[1].removeprefix("config.")
        text = f"unknown config key {key!r}; every key is declared in configs/default.py"
    if isinstance(e, AttributeError | KeyError):
        hint = f" ({lines[1]})" if len(lines) > 1 else ""
        text = f"unknown config key {lines[0]!r}{hint}; every key is declared in configs/default.py"
    return text


def main(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> int:
    if len(argv) > 1:
        print(
            f"error: unexpected arguments {argv[1:]}; flags look like --name=value", file=sys.stderr
        )
        return EXIT_BAD_INPUT
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    # Heavy imports after flag parsing so that --help is instant; TF hides GPUs on import.
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    from agre_jax import distributed, errors, loop, settings, sweep_runner, train, workdir

    config = flag_values.config
    source = getattr(flag_values["config"], "config_filename", "") or ""
    run_dir = flag_values.workdir or f"runs/{_config_name(source)}"
    try:
        # Before anything touches a device: join the other processes of a multi-process run.
        spec = distributed.spec(config)
        if spec is not None and "sweep" in config:
            raise errors.ConfigError(
                "a sweep runs each of its runs as one job; launch the sweep as one process "
                "(distributed.num_processes=1, which also overrides SLURM / Open MPI task "
                "counts) and spread its runs with sweep.launcher"
            )
        if spec is not None:  # (one process: no JAX backend starts here; see sweep_runner)
            # A config mistake is reported now, not after waiting for processes that may never
            # join; this starts no JAX backend (the device layout is checked once joined).
            settings.validate(config, before_join=True)
            distributed.initialize(spec)
        if "sweep" not in config:  # (a sweep's runs resolve it in their jobs: launch.run_one)
            config = settings.resolve_dtype(config)  # 'auto' -> this backend's dtype
        if spec is not None:
            distributed.check_same_config(workdir.config_dict(config), workdir.config_differences)
            # Process 0 prints for the run. The others' stdout goes to /dev/null at the
            # descriptor, so C++ prints too; process 0 keeps the one line gloo prints when its
            # collectives connect ("[Gloo] Rank 0 is connected to ..."): jaxlib 0.10's gloo
            # writes it to std::cout unconditionally (pytorch/gloo#462; GLOO_LOG_LEVEL came to
            # gloo later, in d97133a), and neither JAX nor XLA has a flag for it.
            if not distributed.is_primary():
                sys.stdout.flush()
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if "sweep" in config:
            return sweep_runner.run_sweep(config, run_dir, flag_values.overwrite, source)[
                "exit_code"
            ]
        train.train_and_evaluate(config, run_dir, overwrite=flag_values.overwrite)
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (loop.NonFiniteLossError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        where = e.filename or run_dir
        print(
            f"error: cannot write {where} ({e.strerror}). Free space or fix the permissions, "
            "then rerun the same command: it resumes from the last checkpoint.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


def _config_name(path: str) -> str:
    path = path or "run"
    return path.split("/")[-1].split(":")[0].removesuffix(".py") + (
        "_" + path.split(":")[1] if ":" in path else ""
    )


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
