"""MTEB reranking tasks built from local BEIR-layout folders (no Hub download): `local_task`.

The task is an `mteb.abstasks.retrieval.AbsTaskRetrieval` whose `load_data` reads the same files, queries and
first stage eval.py reads (`kalm_jax.data.beir.load_beir`, `kalm_jax.data.bm25` or a TREC run file) and sets the
corpus, queries, relevant docs and the first stage's candidates as ``top_ranked`` (a reranking task: a
cross-encoder scores exactly those candidates). Titles and texts are stripped, so MTEB's document text
(``title + " " + text``) is `kalm_jax.data.beir.passage_text`, the string eval.py encodes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def task_name(dataset: str) -> str:
    """The MTEB task name of a local dataset folder: ``KaLMLocal-<folder>`` (non-alphanumerics become '-')."""
    return "KaLMLocal-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-") or "dataset")


def first_stage_run(
    data, queries: Mapping[str, str], first_stage: str, top_k: int, dataset_dir: Path, on_unknown_docs: str = "error"
) -> dict[str, dict[str, float]]:
    """The first stage of `queries` as eval.py builds it: bm25 (bm25s over the corpus) or ``run:<path>`` (relative
    to the dataset folder or absolute), each query's top `top_k` by score (ties by doc id)."""
    from kalm_jax.data.trec import read_run

    if first_stage == "bm25":
        from kalm_jax.data.bm25 import BM25Index

        logging.getLogger("bm25s").setLevel(logging.WARNING)
        index = BM25Index.build(data.corpus, show_progress=False)
        return index.search(queries, top_k, show_progress=False)
    if not first_stage.startswith("run:"):
        raise ValueError(f"first_stage must be 'bm25' or 'run:<path>', got {first_stage!r}")
    path = Path(first_stage[len("run:") :])
    path = path if path.is_absolute() else dataset_dir / path
    if not path.is_file():
        raise FileNotFoundError(f"first-stage run {path} does not exist")
    full = read_run(path)
    run = {q: full.get(q, {}) for q in queries}
    unknown = sorted({d for docs in run.values() for d in docs if d not in data.corpus})
    if unknown:
        msg = f"{path}: {len(unknown)} docs of the run are not in the corpus, e.g. {unknown[:5]}"
        if on_unknown_docs == "error":
            raise ValueError(msg + "; pass on_unknown_docs='drop' to drop them (they cannot be reranked)")
        log.warning("%s; dropping them", msg)
        run = {q: {d: s for d, s in docs.items() if d in data.corpus} for q, docs in run.items()}
    return {q: dict(sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]) for q, docs in run.items()}


def local_task(
    data_dir: str | Path,
    dataset: str,
    split: str = "test",
    first_stage: str = "bm25",
    top_k: int = 100,
    *,
    max_queries: int = 0,
    instruction: str | Mapping[str, str] | None = None,
    on_unknown_docs: str = "error",
    name: str | None = None,
):
    """An MTEB reranking task over ``data_dir/dataset`` (BEIR layout), fully offline.

    Args:
      data_dir: the folder holding BEIR dataset folders (eval.py's ``data_dir``).
      dataset: the dataset folder name (e.g. ``scifact``; ``xquad-r/en`` works too).
      split: the qrels split evaluated.
      first_stage: ``bm25`` or ``run:<path>``, as in eval.py; its top `top_k` per query become ``top_ranked``.
      max_queries: only the first N judged queries (0 = all), as eval.py's ``max_queries``.
      instruction: an ``instruction`` column for the queries (an instruction task): one string for every query or
        {query id: instruction}; the adapter puts it in ``<Instruct>``.
      name: the MTEB task name (default ``KaLMLocal-<dataset>``).
    Returns:
      an `AbsTaskRetrieval` instance (main score ``ndcg_at_10``), ready for `mteb.evaluate`.
    """
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    folder = Path(data_dir) / dataset
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset {dataset!r}: {folder} is not a directory")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 0:
        raise ValueError(f"max_queries must be an integer >= 0 (0 = all), got {max_queries!r}")
    metadata = TaskMetadata(
        name=name or task_name(dataset),
        description=f"BEIR-layout folder {folder} reranked over its first stage ({first_stage}, top {top_k}); "
        f"built by kalm_jax.mteb.local_task.",
        dataset={"path": str(folder), "revision": "local"},
        type="Reranking" if instruction is None else "InstructionReranking",
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
    )

    class LocalBeirReranking(AbsTaskRetrieval):
        __doc__ = f"MTEB reranking task over {folder} ({split} split), built offline by kalm_jax.mteb.local_task."

        def load_data(self, num_proc=None, **kwargs) -> None:
            if self.data_loaded:
                return
            self.dataset = {
                "default": {
                    split: load_split(folder, split, first_stage, top_k, max_queries, instruction, on_unknown_docs)
                }
            }
            self.data_loaded = True

        def task_specific_scores(self, scores, qrels, results, hf_split, hf_subset):
            """MTEB rounds its means to 5 decimals; `ndcg_at_10_unrounded` is the same mean of MTEB's per-query
            pytrec_eval nDCG@10, unrounded (what the equality with eval.py is checked on)."""
            per_query = [s["ndcg_cut_10"] for s in scores.values() if "ndcg_cut_10" in s]
            return {"ndcg_at_10_unrounded": sum(per_query) / len(per_query) if per_query else 0.0}

    LocalBeirReranking.metadata = metadata
    LocalBeirReranking.__name__ = LocalBeirReranking.__qualname__ = f"Local_{re.sub(r'[^A-Za-z0-9]', '_', dataset)}"
    return LocalBeirReranking()


def load_split(
    folder: Path,
    split: str,
    first_stage: str,
    top_k: int,
    max_queries: int,
    instruction: str | Mapping[str, str] | None,
    on_unknown_docs: str = "error",
) -> dict:
    """The `RetrievalSplitData` (corpus, queries, relevant_docs, top_ranked) of one BEIR folder and split."""
    from datasets import Dataset

    from kalm_jax.data.beir import load_beir

    data = load_beir(folder, split, on_missing="keep")
    queries = dict(data.queries)
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])
    run = first_stage_run(data, queries, first_stage, top_k, folder, on_unknown_docs)
    top_ranked = {q: [d for d, _ in sorted(run.get(q, {}).items(), key=lambda kv: (-kv[1], kv[0]))] for q in queries}
    empty = [q for q, docs in top_ranked.items() if not docs]
    if empty:
        log.warning(
            "%s: %d of %d queries have no first-stage candidates (they score 0), e.g. %s",
            folder,
            len(empty),
            len(queries),
            empty[:3],
        )
    ids = list(data.corpus)
    corpus = Dataset.from_dict(
        {
            "id": ids,
            "title": [(data.corpus[d].get("title") or "").strip() for d in ids],
            "text": [(data.corpus[d].get("text") or "").strip() for d in ids],
        }
    )
    qcols = {"id": list(queries), "text": list(queries.values())}
    if instruction is not None:
        if isinstance(instruction, str):
            qcols["instruction"] = [instruction] * len(queries)
        else:
            missing = [q for q in queries if q not in instruction]
            if missing:
                raise KeyError(f"instruction has no entry for {len(missing)} queries, e.g. {missing[:3]}")
            qcols["instruction"] = [instruction[q] for q in queries]
    relevant = {q: dict(data.qrels[q]) for q in queries if q in data.qrels}
    return {"corpus": corpus, "queries": Dataset.from_dict(qcols), "relevant_docs": relevant, "top_ranked": top_ranked}


__all__ = ["local_task", "load_split", "first_stage_run", "task_name"]
