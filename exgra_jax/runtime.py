"""Process set-up shared by every entry point: which JAX platforms to start, and quiet logs.

With ``libtpu`` installed (it is what lets ``tools/aot_compile.py`` compile for TPUs on a
CPU machine), JAX probes for TPUs at start-up and, on a machine without any, libtpu prints
``E0000 ... INVALID_ARGUMENT`` errors. A TPU host exposes its chips as ``/dev/accel*``
(v2-v4) or ``/dev/vfio/N`` (v5e and later); without either, TPUs are left out of the
platform list. An explicit ``JAX_PLATFORMS`` always wins.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

# Libraries whose INFO output buries the training log (orbax prints ~300 lines a demo).
_CHATTY = ("absl", "orbax", "jax._src", "grain", "tensorstore", "etils", "httpx")


def has_tpu_devices() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _cuda_plugin_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None
               for name in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


def platforms_without_tpu() -> str | None:
    """The platform list to use, or None to keep JAX's default (TPU host or explicit)."""
    if os.environ.get("JAX_PLATFORMS") or has_tpu_devices():
        return None
    return "cuda,cpu" if _cuda_plugin_installed() else "cpu"


def configure_platforms() -> None:
    """Call before the first JAX computation (backends start lazily)."""
    chosen = platforms_without_tpu()
    if chosen is not None:
        import jax  # noqa: PLC0415

        jax.config.update("jax_platforms", chosen)


def quiet_logs(level: int = logging.WARNING) -> None:
    """Library chatter at ``level``; our own progress lines are printed, not logged."""
    for name in _CHATTY:
        logging.getLogger(name).setLevel(level)
    try:
        from absl import logging as absl_logging  # noqa: PLC0415

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def setup_process() -> None:
    configure_platforms()
    quiet_logs()
