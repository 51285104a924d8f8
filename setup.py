"""exgra-jax: ExGra-Med medical vision-language models in JAX."""

from setuptools import find_packages, setup

setup(
    name="exgra_jax",
    version="0.1.0",
    description="JAX/Flax framework for ExGra-Med medical vision-language models",
    packages=find_packages(include=["exgra_jax", "exgra_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.10,<0.3",
        "ml_collections>=1.0",
        "einops>=0.8",
        "absl-py>=2.0",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pillow>=10.0",
        # Tokenizers and config objects only; torch is never imported at run time.
        "transformers>=4.50",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
    ],
    extras_require={
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        "data": [
            "tensorflow-datasets>=4.9.7",
            "array-record>=0.5",
            "pyarrow>=15",
            "importlib-resources>=6",  # tfds needs it but does not declare it
        ],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "torch==2.13.0",
            "transformers>=4.50",
            "torch-geometric>=2.5",
            "scipy>=1.11",
            "lap>=0.5",
            "nltk>=3.8",
            "ruff>=0.6",
            # The real Mistral-7B tokenizer (tokenizer.model.v1) for the template tests.
            "mistral-common==1.9.1",
            # Compiles for TPU topologies on a CPU (tools/aot_compile.py and its test).
            "libtpu",
        ],
    },
)
