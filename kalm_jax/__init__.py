"""kalm-jax: a JAX/Flax reimplementation of the KaLM-Reranker-V1 passage reranker.

Model code (`config`, `layers`, `model`, `mep`, `scoring`, `hf`) imports nothing from training, data or
evaluation. Submodules are imported lazily so `import kalm_jax` stays cheap.
"""

from __future__ import annotations

import importlib

from kalm_jax.extras import quiet_libtpu_without_tpu

__version__ = "0.1.0"

quiet_libtpu_without_tpu()

_SUBMODULES = {
    "config",
    "layers",
    "model",
    "mep",
    "scoring",
    "hf",
    "prompts",
    "tokenizer",
    "hf_tokenizer",
    "checkpointing",
    "mesh",
    "passage_states",
    "reranker",
    "data",
    "evaluation",
    "training",
    "bench",
}


def __getattr__(name: str):
    if name == "Reranker":
        return importlib.import_module("kalm_jax.reranker").Reranker
    if name == "PassageStates":
        return importlib.import_module("kalm_jax.passage_states").PassageStates
    if name in _SUBMODULES:
        return importlib.import_module(f"kalm_jax.{name}")
    raise AttributeError(f"module 'kalm_jax' has no attribute {name!r}")
