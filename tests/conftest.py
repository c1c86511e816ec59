"""Test set-up that must happen before anything imports JAX or TensorFlow.

- torch and torchvision are imported first: importing TensorFlow before torchvision segfaults
  with the CUDA torch build (its triton libraries clash with TensorFlow's).
- Four fake CPU devices so that pmap is tested on this machine.
- XLA's slow optimisation passes off: tests run tiny models, where compiling dominates
  (measured: the weighting tests went from minutes to about one). Subprocesses inherit it.
- XLA:CPU's fusion emitters off: they cost most of the compile time of a tiny step (measured
  on test_distill's steps: 5.9 / 10.7 / 9.6 s to compile AVER / agre / agre_batch with them,
  2.0 / 3.3 / 4.9 s without; running times alike).
- One persistent compilation cache for the session, removed at its end: the end-to-end tests
  run main.py many times on the same tiny config, and each run would otherwise recompile the
  same programs.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=4 --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Made by the first process that loads this file (pytest's controller); xdist workers and
    # subprocesses inherit it. Removed when that process exits: each session's cache is tens
    # of MB, and left behind they filled the disk that CI runs on.
    _cache_dir = tempfile.mkdtemp(prefix="agre_jax_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401

# The files that take longest (end-to-end processes, whole-step compilations), first: with
# `--dist loadfile` each file runs on one worker, and xdist hands them out in collection order
# (the Makefile passes --no-loadscope-reorder; by default xdist orders files by their number
# of tests, which put these few-test, long files last and left one worker idle at the end).
LONGEST_FIRST = (
    "test_multiprocess.py",
    "test_sweep_launcher.py",
    "test_main.py",
    "test_sweep.py",
    "test_distill.py",
    "test_weighting.py",
    "test_train.py",
    "test_conv.py",
    "test_step_benchmark.py",
    "test_pretrain.py",
    "test_bad_inputs.py",
    "test_convert.py",
    "test_gpu_benchmark.py",
    "test_device_input.py",
    "test_bf16.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
