"""MTEB (2.x) integration: a reranking adapter over the inference engine, offline tasks from BEIR folders, and a CLI.

    from kalm_jax.mteb import KaLMJaxReranker, local_task
    import mteb
    model = KaLMJaxReranker("path/to/KaLM-Reranker-V1-Nano")            # ratio 4, the released prompts and cuts
    task = local_task("../shared/data", "scifact", first_stage="bm25", top_k=100)
    mteb.evaluate(model, task, cache=mteb.ResultCache("out/mteb"))

`python -m kalm_jax.mteb --config.checkpoint=CKPT --config.data_dir=DATA --config.tasks=local:scifact` runs it from
the command line (`kalm_jax.cli.mteb`). Needs the ``mteb`` extra (``pip install 'kalm-jax[mteb]'``); this package
imports mteb only when a task or model metadata is built. docs/evaluation.md, section "MTEB".
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "KaLMJaxReranker": "adapter",
    "NonFiniteScoreError": "adapter",
    "text_id": "adapter",
    "local_task": "tasks",
    "task_name": "tasks",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kalm_jax.mteb.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kalm_jax.mteb' has no attribute {name!r}")


__all__ = ["KaLMJaxReranker", "NonFiniteScoreError", "local_task", "task_name", "text_id"]
