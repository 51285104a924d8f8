"""Test setup: eight simulated CPU devices, float32 matmuls at full precision."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JSON record indexes (data/sources.py) go to a per-session temporary folder, not ~/.cache;
# subprocesses that tests start inherit it.
if "EXGRA_DATA_CACHE" not in os.environ:
    import tempfile

    os.environ["EXGRA_DATA_CACHE"] = tempfile.mkdtemp(prefix="exgra_json_index_")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
