"""Test set-up that must happen before anything imports JAX or TensorFlow.

- torch and torchvision are imported first: importing TensorFlow before torchvision segfaults
  with the CUDA torch build (its triton libraries clash with TensorFlow's).
- Four fake CPU devices so that pmap is tested on this machine.
- XLA's slow optimisation passes off: tests run tiny models, where compiling dominates
  (measured: the weighting tests went from minutes to about one). Subprocesses inherit it.
- One persistent compilation cache for the session: the end-to-end tests run main.py many
  times on the same tiny config, and each run would otherwise recompile the same programs.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="agre_jax_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401
