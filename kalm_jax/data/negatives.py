"""Hard-negative mining: a BEIR split + a first-stage run (BM25 by default) -> reranker training JSONL.

For each judged query: positives are the documents judged >= `min_positive_score`; negatives are drawn
from the first-stage ranking, ranks ``[sample_start, sample_end)`` (0-based), after removing every
document judged relevant at any grade (> 0) and every document whose passage text equals a positive's.
`num_negatives` are drawn without replacement, deterministically from (seed, query id), and kept in
rank order; a query with fewer candidates keeps all of them (the training pipeline then samples with
replacement). Queries with no positive or no candidate are skipped and counted, never silently.

CLI (settings in configs/negatives.py): ``kalm-negatives --config.data_dir=DIR
--config.dataset=scifact --config.split=train --config.out=train.jsonl``
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kalm_jax.data.beir import BeirDataset
from kalm_jax.data.textfile import SkipCounter
from kalm_jax.data.training_jsonl import TrainingExample
from kalm_jax.data.trec import Run, ranked

log = logging.getLogger(__name__)


def example_rng(seed: int, key: str) -> np.random.Generator:
    """A generator determined by (seed, key) only, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def mine_hard_negatives(
    dataset: BeirDataset,
    run: Mapping[str, Mapping[str, float]],
    *,
    num_negatives: int = 15,
    sample_start: int = 0,
    sample_end: int = 100,
    seed: int = 0,
    min_positive_score: int = 1,
    prompt: str | None = None,
    skipped: SkipCounter | None = None,
    show_progress: bool = True,
) -> list[TrainingExample]:
    """Training examples for every judged query of `dataset` (one per query, all its positives).

    Args:
      dataset: a BEIR split with qrels.
      run: first-stage ranking ``{qid: {docid: score}}`` covering the judged queries.
      num_negatives: negatives per query (at most).
      sample_start, sample_end: 0-based rank range of the ranking to draw negatives from.
      seed: sampling seed.
      min_positive_score: qrels grade that makes a document a positive.
      prompt: task instruction stored in each example's ``prompt`` field (None: not written).
      skipped: receives the counts of queries skipped for lack of positives or candidates.
    """
    if not 0 <= sample_start < sample_end:
        raise ValueError(f"need 0 <= sample_start < sample_end, got {sample_start}, {sample_end}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    skipped = skipped if skipped is not None else SkipCounter()
    examples: list[TrainingExample] = []
    for qid in tqdm(dataset.qrels, desc="mining negatives", disable=not show_progress):
        judged = dataset.qrels[qid]
        pos_ids = [d for d, s in judged.items() if s >= min_positive_score and d in dataset.corpus]
        if not pos_ids:
            skipped.counts["query without positive in corpus"] += 1
            continue
        if qid not in run:
            skipped.counts["query missing from run"] += 1
            continue
        pos_texts = [dataset.passage(d) for d in pos_ids]
        pos_set = set(pos_texts)
        candidates = [
            d
            for d, _ in ranked(run[qid])[sample_start:sample_end]
            if judged.get(d, 0) <= 0 and d in dataset.corpus and dataset.passage(d) not in pos_set
        ]
        if not candidates:
            skipped.counts["query without negative candidate"] += 1
            continue
        if len(candidates) > num_negatives:
            picked = example_rng(seed, qid).choice(len(candidates), size=num_negatives, replace=False)
            candidates = [candidates[i] for i in sorted(picked)]
        examples.append(
            TrainingExample(
                query=dataset.queries[qid],
                pos=pos_texts,
                neg=[dataset.passage(d) for d in candidates],
                prompt=prompt,
                qid=qid,
                pos_ids=pos_ids,
                neg_ids=candidates,
            )
        )
    if skipped.total:
        log.warning("%s/%s: %d queries skipped: %s", dataset.path, dataset.split, skipped.total, dict(skipped.counts))
    return examples


def run_cli(config) -> int:
    """Mines the training JSONL of `config` (configs/negatives.py) and prints a summary line."""
    from kalm_jax import cli
    from kalm_jax.data.beir import load_beir
    from kalm_jax.data.bm25 import BM25Index
    from kalm_jax.data.training_jsonl import write_training_jsonl
    from kalm_jax.data.trec import read_run, write_run

    for key in ("data_dir", "dataset", "out"):
        if not config[key]:
            raise cli.ConfigError(
                f"--config.{key} is required (kalm-negatives "
                "--config.data_dir=DIR --config.dataset=scifact --config.out=train.jsonl)"
            )
    if config.on_error not in ("raise", "skip"):
        raise cli.ConfigError(f"--config.on_error must be raise or skip, got {config.on_error!r}")
    if config.on_missing not in ("raise", "keep", "drop"):
        raise cli.ConfigError(f"--config.on_missing must be raise, keep or drop, got {config.on_missing!r}")
    cli.setup_logging()
    logging.getLogger("bm25s").setLevel(logging.WARNING)

    ds = load_beir(
        Path(config.data_dir) / config.dataset, config.split, on_error=config.on_error, on_missing=config.on_missing
    )
    if config.run:
        run: Run = read_run(config.run)
    else:
        run = BM25Index.build(ds.corpus).search(ds.queries, max(config.depth, config.sample_end))
        if config.save_run:
            write_run(run, config.save_run, tag="bm25")
    skipped = SkipCounter()
    examples = mine_hard_negatives(
        ds,
        run,
        num_negatives=config.num_negatives,
        sample_start=config.sample_start,
        sample_end=config.sample_end,
        seed=config.seed,
        min_positive_score=config.min_positive_score,
        prompt=config.prompt or None,
        skipped=skipped,
    )
    n = write_training_jsonl(examples, config.out)
    negs = [len(e.neg) for e in examples]
    print(
        f"{n} examples -> {config.out}; negatives per query min {min(negs, default=0)} "
        f"mean {np.mean(negs) if negs else 0:.1f}; skipped {dict(skipped.counts)}"
    )
    return 0
