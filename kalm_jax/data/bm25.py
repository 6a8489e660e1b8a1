"""BM25 first stage with `bm25s` (English stop words, Snowball stemming via PyStemmer).

Defaults k1=0.9, b=0.4 (the Anserini/Pyserini defaults), Lucene IDF, passages as `passage_text`
(title + text). A `BM25Index` is built once and reused for any number of query sets; it saves to and
loads from a directory (numpy arrays + JSON, no pickle).

CLI (settings in configs/bm25.py): ``kalm-bm25 --config.data_dir=DIR --config.dataset=scifact
--config.split=test --config.k=100 --config.out=run.trec.gz``
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kalm_jax.data.beir import Doc, passage_text
from kalm_jax.data.trec import Run

if TYPE_CHECKING:  # an optional package (the eval extra), imported where it is used
    import bm25s

log = logging.getLogger(__name__)

DOC_IDS_FILE = "doc_ids.json"


class BM25Index:
    """A bm25s index over a corpus, with the doc ids of its rows.

    Attributes:
      doc_ids: corpus doc id of each index row.
      retriever: the `bm25s.BM25` object.
    """

    def __init__(
        self, retriever: bm25s.BM25, doc_ids: list[str], language: str = "english", stopwords: str | None = "en"
    ):
        self.retriever = retriever
        self.doc_ids = doc_ids
        self.language = language
        self.stopwords = stopwords
        import Stemmer

        self._stemmer = Stemmer.Stemmer(language) if language else None

    @classmethod
    def build(
        cls,
        corpus: Mapping[str, Doc | str],
        *,
        k1: float = 0.9,
        b: float = 0.4,
        method: str = "lucene",
        language: str = "english",
        stopwords: str | None = "en",
        show_progress: bool = True,
    ) -> BM25Index:
        """Indexes `corpus` (doc id -> BEIR doc or passage string)."""
        if not corpus:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        doc_ids = list(corpus)
        texts = [v if isinstance(v, str) else passage_text(v) for v in corpus.values()]
        import bm25s
        import Stemmer

        stemmer = Stemmer.Stemmer(language) if language else None
        tokens = bm25s.tokenize(texts, stopwords=stopwords or [], stemmer=stemmer, show_progress=show_progress)
        retriever = bm25s.BM25(k1=k1, b=b, method=method)
        retriever.index(tokens, show_progress=show_progress)
        return cls(retriever, doc_ids, language, stopwords)

    def search(self, queries: Mapping[str, str], k: int = 100, *, show_progress: bool = True) -> Run:
        """Top-`k` documents per query as a run ``{qid: {docid: score}}``.

        Documents sharing no term with the query (score 0) are left out, so a query may get fewer than
        `k`; a query with no indexable term (e.g. only stop words) gets an empty ranking and a warning.
        """
        import bm25s

        qids = list(queries)
        tokens = bm25s.tokenize(
            [queries[q] for q in qids],
            stopwords=self.stopwords or [],
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
        )
        k = min(k, len(self.doc_ids))
        run: Run = {}
        empty = [q for q, t in zip(qids, tokens) if not t]
        if empty:
            log.warning("%d queries have no indexable term and get an empty ranking, e.g. %r", len(empty), empty[:3])
        keep = [i for i, t in enumerate(tokens) if t]
        if keep:
            rows, scores = self.retriever.retrieve(
                [tokens[i] for i in keep], k=k, show_progress=show_progress, n_threads=1
            )
        for qid in qids:
            run[qid] = {}
        for j, i in enumerate(keep):
            run[qids[i]] = {self.doc_ids[int(r)]: float(s) for r, s in zip(rows[j], scores[j]) if s > 0}
        return run

    def save(self, directory: str | Path) -> None:
        """Writes the index arrays, vocabulary, parameters and doc ids to `directory`."""
        directory = Path(directory)
        self.retriever.save(str(directory), show_progress=False)
        meta = {"doc_ids": self.doc_ids, "language": self.language, "stopwords": self.stopwords}
        (directory / DOC_IDS_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path) -> BM25Index:
        """Reads an index written by `save`."""
        directory = Path(directory)
        meta_path = directory / DOC_IDS_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not a BM25Index directory")
        import bm25s

        meta = json.loads(meta_path.read_text())
        retriever = bm25s.BM25.load(str(directory), allow_pickle=False, show_progress=False)
        n_rows = int(np.asarray(retriever.scores["num_docs"]))
        if n_rows != len(meta["doc_ids"]):
            raise ValueError(
                f"{directory}: index has {n_rows} documents but {DOC_IDS_FILE} lists {len(meta['doc_ids'])}"
            )
        return cls(retriever, meta["doc_ids"], meta["language"], meta["stopwords"])


def bm25_run(corpus: Mapping[str, Doc | str], queries: Mapping[str, str], k: int = 100, **build_kwargs) -> Run:
    """Builds a `BM25Index` over `corpus` and returns the top-`k` run for `queries`."""
    return BM25Index.build(corpus, **build_kwargs).search(queries, k)


def run_cli(config) -> int:
    """Writes the BM25 run of `config` (configs/bm25.py) and prints its nDCG@10 and R@100."""
    import pytrec_eval

    from kalm_jax import cli
    from kalm_jax.data.beir import load_beir
    from kalm_jax.data.trec import write_run

    for key in ("data_dir", "dataset", "out"):
        if not config[key]:
            raise cli.ConfigError(
                f"--config.{key} is required (kalm-bm25 --config.data_dir=DIR "
                "--config.dataset=scifact --config.out=run.trec.gz)"
            )
    if config.on_missing not in ("raise", "keep", "drop"):
        raise cli.ConfigError(f"--config.on_missing must be raise, keep or drop, got {config.on_missing!r}")
    cli.setup_logging()
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    ds = load_beir(Path(config.data_dir) / config.dataset, config.split, on_missing=config.on_missing)
    run = BM25Index.build(ds.corpus, k1=config.k1, b=config.b).search(ds.queries, config.k)
    write_run(run, config.out, tag=config.tag)
    evaluator = pytrec_eval.RelevanceEvaluator(ds.qrels, {"ndcg_cut.10", "recall.100"})
    per_query = evaluator.evaluate(run)
    ndcg = np.mean([m["ndcg_cut_10"] for m in per_query.values()])
    recall = np.mean([m["recall_100"] for m in per_query.values()])
    print(
        f"{config.dataset}/{config.split}: {len(run)} queries -> {config.out}; nDCG@10 {ndcg:.4f}, R@100 {recall:.4f}"
    )
    return 0
