"""Reranking first-stage candidates with the jitted scorer over cached passage states.

The online path of the reranker: each query's decoder prompt is tokenized once, its candidates' pooled
states are looked up by doc id (from an in-memory `PassageStates` or a `PassageStore`), and (prompt,
passage) pairs of several queries are scored together by the inference engine
(`kalm_jax.inference.engine.InferenceEngine.margins`). No passage is encoded here.

`rerank_run(engine, queries, run, states, ratio, instruction)` returns the reranked run; `rerank` also
returns timings. A cascade scores the whole
candidate list at a coarse ratio and rescores only its top K at the fine ratio.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from kalm_jax.inference.states import PassageStates
from kalm_jax.text import prompts

log = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]


class Scorer(Protocol):
    """What `rerank` scores with: `kalm_jax.inference.engine.InferenceEngine` (or a test double of its `margins`)."""

    compiles: int

    def margins(
        self,
        prompt_rows: Sequence[Sequence[int]],
        prompt_of,
        states: PassageStates,
        passage_of,
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """fp32 margins [N] for pairs (prompt_rows[prompt_of[i]], states row passage_of[i])."""


class StateSource(Protocol):
    """Anything that returns cached passage states by doc id at a requested ratio."""

    def lookup(self, doc_ids: Sequence[str], ratio: int) -> PassageStates:
        """States of `doc_ids` (in that order) pooled at `ratio`; KeyError naming an unknown id."""

    def __contains__(self, doc_id: str) -> bool: ...


class InMemoryStates:
    """A `StateSource` over one `PassageStates` with ids; coarser ratios are re-pooled once and kept."""

    def __init__(self, states: PassageStates):
        if states.ids is None:
            raise ValueError("PassageStates without ids cannot be looked up by doc id")
        self._by_ratio = {states.ratio: states}
        self._base = states
        self._row = {d: i for i, d in enumerate(states.ids)}
        if len(self._row) != len(states.ids):
            raise ValueError("PassageStates ids are not unique")

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row

    def at_ratio(self, ratio: int) -> PassageStates:
        if ratio not in self._by_ratio:
            self._by_ratio[ratio] = self._base.to_ratio(ratio)
        return self._by_ratio[ratio]

    def lookup(self, doc_ids: Sequence[str], ratio: int) -> PassageStates:
        missing = [d for d in doc_ids if d not in self._row]
        if missing:
            raise KeyError(f"{len(missing)} doc ids have no cached states, e.g. {missing[:3]}")
        return self.at_ratio(ratio).select([self._row[d] for d in doc_ids])


def as_source(states) -> StateSource:
    """Wraps a `PassageStates` as a `StateSource`; a store or another source passes through."""
    return InMemoryStates(states) if isinstance(states, PassageStates) else states


@dataclasses.dataclass
class RerankOutput:
    """A reranked run plus what it cost.

    online_seconds: wall time of prompt lookup, state gathering and scoring, compilation excluded
      (a batch that compiled is timed again once compiled). compile_seconds: the excluded part.
    """

    run: Run
    queries: int
    pairs: int
    online_seconds: float
    compile_seconds: float

    @property
    def seconds_per_query(self) -> float:
        return self.online_seconds / max(1, self.queries)


def _candidates(run: Mapping[str, Mapping[str, float]], qid: str, top_k: int | None) -> list[str]:
    ranked = sorted(run.get(qid, {}).items(), key=lambda kv: (-kv[1], kv[0]))
    return [d for d, _ in (ranked if top_k is None else ranked[:top_k])]


def _batches(items: list[tuple[str, list[str]]], batch_pairs: int):
    """Groups (qid, docs) into batches of about `batch_pairs` pairs; a long candidate list is split."""
    batch, size = [], 0
    for qid, docs in items:
        for start in range(0, len(docs), batch_pairs):
            part = docs[start : start + batch_pairs]
            if size and size + len(part) > batch_pairs:
                yield batch
                batch, size = [], 0
            batch.append((qid, part))
            size += len(part)
    if batch:
        yield batch


def score_candidates(
    scorer: Scorer,
    prompt_rows: Mapping[str, np.ndarray],
    source: StateSource,
    candidates: Mapping[str, list[str]],
    ratio: int,
    *,
    batch_pairs: int = 256,
    progress: bool = False,
    desc: str = "rerank",
) -> tuple[Run, int, float, float]:
    """Scores every (query, candidate) pair; returns ({qid: {doc: margin}}, pairs, online s, compile s)."""
    from tqdm.auto import tqdm

    if isinstance(batch_pairs, bool) or not isinstance(batch_pairs, (int, np.integer)) or batch_pairs < 1:
        raise ValueError(f"batch_pairs must be a positive integer, got {batch_pairs!r}")
    items = [(q, docs) for q, docs in candidates.items() if docs]
    out: Run = {q: {} for q in candidates}
    total_pairs = sum(len(d) for _, d in items)
    online = compile_s = 0.0
    with tqdm(total=total_pairs, desc=desc, unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for batch in _batches(items, batch_pairs):

            def run_batch(batch=batch):
                qids = list(dict.fromkeys(q for q, _ in batch))
                row_of = {q: i for i, q in enumerate(qids)}
                prompt_of = np.asarray([row_of[q] for q, docs in batch for _ in docs], np.int64)
                docs = [d for _, ds in batch for d in ds]
                st = source.lookup(docs, ratio)
                margins = scorer.margins(
                    [prompt_rows[q] for q in qids],
                    prompt_of,
                    st,
                    np.arange(len(docs)),
                    batch_size=len(docs),
                    show_progress=False,
                )
                return [qids[i] for i in prompt_of], docs, np.asarray(margins, np.float32)

            t0 = time.perf_counter()
            before = scorer.compiles
            qids, docs, margins = run_batch()
            elapsed = time.perf_counter() - t0
            if scorer.compiles > before:  # time it again, compiled: compilation is not online cost
                t0 = time.perf_counter()
                qids, docs, margins = run_batch()
                second = time.perf_counter() - t0
                compile_s += max(0.0, elapsed - second)
                elapsed = second
            online += elapsed
            for q, d, m in zip(qids, docs, margins):
                out[q][d] = float(m)
            bar.update(len(docs))
    return out, total_pairs, online, compile_s


def tokenize_prompts(
    prompter,
    queries: Mapping[str, str],
    instruction: str | bool | None = None,
    *,
    system: str | None = None,
    max_query_tokens: int | None = prompts.INFERENCE_QUERY_MAX_TOKENS,
) -> dict[str, np.ndarray]:
    """Decoder prompt token ids per query id (unpadded int32 rows).

    `prompter` is an `InferenceEngine` (its query limit and prompt budget apply; `max_query_tokens` is
    ignored) or a bare tokenizer (then `max_query_tokens` cuts the query).
    """
    if hasattr(prompter, "prompt_ids"):
        return {
            q: np.asarray(prompter.prompt_ids(text, instruction, system, warn=False), np.int32)
            for q, text in queries.items()
        }
    return {
        q: np.asarray(prompts.encode_decoder_prompt(prompter, text, instruction, system, max_query_tokens), np.int32)
        for q, text in queries.items()
    }


def rerank(
    scorer: Scorer,
    prompt_rows: Mapping[str, np.ndarray],
    run: Mapping[str, Mapping[str, float]],
    source,
    ratio: int,
    *,
    top_k: int | None = 100,
    cascade: tuple[int, int] | None = None,
    batch_pairs: int = 256,
    progress: bool = True,
    desc: str = "rerank",
) -> RerankOutput:
    """Reranks the top `top_k` candidates of every query of `prompt_rows` with `margin_fn`.

    Args:
      scorer: the inference engine (or a test double with the same `margins`).
      prompt_rows: {qid: decoder prompt ids}; only these queries are reranked (others are left out).
      run: first-stage {qid: {doc: score}}; a query absent from it gets an empty ranking.
      source: `StateSource` (or `PassageStates` with ids) holding every candidate.
      ratio: MEP ratio of the final scores.
      top_k: candidates per query taken from the first stage (by its score); None takes all.
      cascade: (coarse_ratio, keep): score all candidates at `coarse_ratio`, rescore the top `keep` at
        `ratio`; the rest keep their coarse order below the rescored ones (their scores are shifted
        under the lowest fine score so the run file ranks them there).
    Returns:
      `RerankOutput` whose run maps qid -> {doc: margin} over the reranked candidates.
    """
    source = as_source(source)
    candidates = {q: _candidates(run, q, top_k) for q in prompt_rows}
    unknown = sorted({d for docs in candidates.values() for d in docs if d not in source})
    if unknown:
        raise KeyError(
            f"{len(unknown)} candidate docs have no cached passage states, e.g. {unknown[:5]}; "
            "encode them into the store first"
        )
    if cascade is None:
        scores, pairs, online, comp = score_candidates(
            scorer, prompt_rows, source, candidates, ratio, batch_pairs=batch_pairs, progress=progress, desc=desc
        )
        return RerankOutput(scores, len(prompt_rows), pairs, online, comp)
    coarse_ratio, keep = cascade
    coarse, pairs, online, comp = score_candidates(
        scorer,
        prompt_rows,
        source,
        candidates,
        coarse_ratio,
        batch_pairs=batch_pairs,
        progress=progress,
        desc=f"{desc} (cascade r={coarse_ratio})",
    )
    top = {q: [d for d, _ in sorted(s.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]] for q, s in coarse.items()}
    fine, pairs2, online2, comp2 = score_candidates(
        scorer, prompt_rows, source, top, ratio, batch_pairs=batch_pairs, progress=progress, desc=desc
    )
    merged: Run = {}
    for q, s in coarse.items():
        f = fine.get(q, {})
        rest = {d: v for d, v in s.items() if d not in f}
        if f and rest:
            shift = min(f.values()) - max(rest.values()) - 1.0
            rest = {d: v + shift for d, v in rest.items()}
        merged[q] = {**f, **rest}
    return RerankOutput(merged, len(prompt_rows), pairs + pairs2, online + online2, comp + comp2)


def rerank_run(
    engine,
    queries: Mapping[str, str],
    run: Mapping[str, Mapping[str, float]],
    states,
    ratio: int,
    instruction: str | bool | None = None,
    *,
    system: str | None = None,
    top_k: int | None = 100,
    cascade: tuple[int, int] | None = None,
    batch_pairs: int = 256,
    progress: bool = False,
) -> Run:
    """Reranks `run` for `queries` with `engine` (an `InferenceEngine`) over cached `states`; {qid: {doc: margin}}.

    `states` is a `PassageStates` with ids (at `ratio` or a divisor of it) or a `store.PassageStore`;
    instruction None is `prompts.DEFAULT_INSTRUCTION`, False drops the ``<Instruct>`` line.
    Feed the result to `metrics.evaluate(qrels, run)`.
    """
    rows = tokenize_prompts(engine, queries, instruction, system=system)
    return rerank(
        engine, rows, run, states, ratio, top_k=top_k, cascade=cascade, batch_pairs=batch_pairs, progress=progress
    ).run


__all__ = [
    "rerank_run",
    "rerank",
    "RerankOutput",
    "Scorer",
    "InMemoryStates",
    "StateSource",
    "as_source",
    "score_candidates",
    "tokenize_prompts",
]
