"""`kalm-mteb-bench`: `KaLMJaxReranker` against the naive per-pair path, through MTEB's own search.

The naive path (`NaivePerPairReranker`) is the released PyTorch wrapper's algorithm on the same kalm-jax engine:
pairs sorted by length, in batches of `batch_size` pairs, each batch encoding its own documents (one encoder row
per pair) and scoring them. The adapter encodes each distinct document once per `predict` call and scores all
pairs over the cached states. Both run through `SearchCrossEncoderWrapper.search` on the same local task, so they
score the same pairs; the row reports both paths' encoder rows (documents encoded) and encoder calls, their wall
times (a first, compiling round and a second, compiled one, in one process) and the largest score difference.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from kalm_jax import cli


class NaivePerPairReranker:
    """The released wrapper's per-pair algorithm over a `kalm_jax.Reranker`'s engine (a CrossEncoderProtocol)."""

    def __init__(self, reranker, batch_size: int = 32):
        self.reranker = reranker
        self.batch_size = batch_size
        self.mteb_model_meta = None

    def predict(self, inputs1, inputs2, **kwargs) -> np.ndarray:
        from kalm_jax.inference.engine import probability
        from kalm_jax.mteb.adapter import columns

        q = columns(inputs1, ("text", "query"))
        queries = q.get("query", q.get("text"))
        documents = columns(inputs2, ("text",))["text"]
        engine, rr = self.reranker.engine, self.reranker
        order = np.argsort([-(len(a) + len(b)) for a, b in zip(queries, documents)], kind="stable")
        out = np.zeros(len(queries), np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            states = engine.encode([documents[i] for i in rows], rr.ratio, show_progress=False)
            prompt_rows = [engine.prompt_ids(queries[i], rr.instruction, rr.system, warn=False) for i in rows]
            out[rows] = engine.margins(
                prompt_rows,
                np.arange(len(rows)),
                states,
                np.arange(len(rows)),
                batch_size=self.batch_size,
                show_progress=False,
            )
        return probability(out)


def _search(model, task, top_k: int):
    from mteb.models.search_wrappers import SearchCrossEncoderWrapper

    split = task.dataset["default"][task.metadata.eval_splits[0]]
    wrapper = SearchCrossEncoderWrapper.__new__(SearchCrossEncoderWrapper)
    wrapper.model, wrapper.task_corpus, wrapper.mteb_model_meta = model, None, None
    kw = dict(task_metadata=task.metadata, hf_split=task.metadata.eval_splits[0], hf_subset="default")
    wrapper.index(split["corpus"], encode_kwargs={}, **kw)
    return wrapper.search(
        split["queries"], top_k=top_k, encode_kwargs={"batch_size": 32}, top_ranked=split["top_ranked"], **kw
    )


def run(config) -> int:
    """Measures one row per dataset and prints them (JSON lines; also to `config.out`)."""
    for name in ("checkpoint", "data_dir"):
        if not config[name]:
            raise cli.ConfigError(f"config.{name} is required")
    import jax

    from kalm_jax.inference.reranker import Reranker
    from kalm_jax.mteb.adapter import KaLMJaxReranker
    from kalm_jax.mteb.tasks import local_task

    rr = Reranker.from_pretrained(
        config.checkpoint,
        dtype=config.dtype or None,
        ratio=config.ratio,
        max_query_tokens=config.max_query_tokens,
        max_document_tokens=config.max_document_tokens,
        batch_size=config.batch_size,
        show_progress=False,
    )
    engine = rr.engine
    counts = {"rows": 0, "calls": 0}
    real = engine.encode_batch

    def counting(ids, *a, **k):
        counts["rows"] += len(ids)
        counts["calls"] += 1
        return real(ids, *a, **k)

    engine.encode_batch = counting
    rows = []
    for ds in [d.strip() for d in config.datasets.split(",") if d.strip()]:
        task = local_task(
            config.data_dir, ds, config.split, config.first_stage, config.top_k, max_queries=config.max_queries
        )
        task.load_data()
        paths = {
            "adapter": KaLMJaxReranker(rr, score_batch_size=config.score_batch_size),
            "naive": NaivePerPairReranker(rr, batch_size=config.batch_size),
        }
        measured, results = {}, {}
        for round_ in ("first", "second"):
            for name, model in paths.items():
                counts.update(rows=0, calls=0)
                t0 = time.perf_counter()
                results[name] = _search(model, task, config.top_k)
                seconds = time.perf_counter() - t0
                measured.setdefault(name, {})[f"{round_}_seconds"] = round(seconds, 3)
                measured[name].update(encoder_rows=counts["rows"], encoder_calls=counts["calls"])
        pairs = [(q, d) for q in results["adapter"] for d in results["adapter"][q]]
        diff = max((abs(results["adapter"][q][d] - results["naive"][q][d]) for q, d in pairs), default=0.0)
        row = {
            "dataset": ds,
            "queries": len(results["adapter"]),
            "pairs": len(pairs),
            "top_k": config.top_k,
            "ratio": config.ratio,
            "adapter": measured["adapter"],
            "naive": measured["naive"],
            "encoder_rows_ratio": round(
                measured["naive"]["encoder_rows"] / max(1, measured["adapter"]["encoder_rows"]), 2
            ),
            "wall_ratio_second": round(measured["naive"]["second_seconds"] / measured["adapter"]["second_seconds"], 2),
            "wall_ratio_first": round(measured["naive"]["first_seconds"] / measured["adapter"]["first_seconds"], 2),
            "max_abs_score_diff": float(diff),
            "backend": jax.default_backend(),
            "devices": len(engine.devices),
            "dtype": str(rr.model.dtype),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        }
        rows.append(row)
        print(json.dumps(row))
    del engine.encode_batch
    if config.out:
        Path(config.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0
