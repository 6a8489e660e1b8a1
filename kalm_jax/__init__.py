"""kalm-jax: a JAX/Flax reimplementation of the KaLM-Reranker-V1 passage reranker.

The package, by responsibility:

  model/        config, layers, attention (XLA, banded, splash), the T5Gemma 2 model, MEP pooling
  text/         tokenizers (SentencePiece, tokenizer.json) and the reranking prompt
  checkpoints/  Hugging Face safetensors, the native Orbax format, integrity, the one loader, conversion
  inference/    the jitted hot paths, the one engine, passage states, the Reranker
  parallel/     the device mesh, multi-process start-up, the local launcher
  data/ training/ evaluation/ mteb/   the three jobs' pipelines
  perf/         TPU ahead-of-time analysis, the benchmark suite, FLOP counts, TPU planning
  cli/          the one config entry and one module per command; configs/ holds their values

Model code imports nothing from training, data or evaluation. Submodules are imported lazily so
`import kalm_jax` stays cheap.
"""

from __future__ import annotations

import importlib

from kalm_jax.extras import quiet_libtpu_without_tpu

__version__ = "0.1.0"

quiet_libtpu_without_tpu()

_SUBMODULES = {
    "model",
    "text",
    "checkpoints",
    "inference",
    "parallel",
    "data",
    "training",
    "evaluation",
    "perf",
    "cli",
}


def __getattr__(name: str):
    if name == "Reranker":
        return importlib.import_module("kalm_jax.inference.reranker").Reranker
    if name == "PassageStates":
        return importlib.import_module("kalm_jax.inference.states").PassageStates
    if name in _SUBMODULES:
        return importlib.import_module(f"kalm_jax.{name}")
    raise AttributeError(f"module 'kalm_jax' has no attribute {name!r}")
