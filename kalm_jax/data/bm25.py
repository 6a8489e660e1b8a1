"""BM25 first stage with `bm25s` (English stop words, Snowball stemming via PyStemmer).

Defaults k1=0.9, b=0.4 (the Anserini/Pyserini defaults), Lucene IDF, passages as `passage_text`
(title + text). A `BM25Index` is built once and reused for any number of query sets; it saves to and
loads from a directory (numpy arrays + JSON, no pickle).

CLI: ``python -m kalm_jax.data.bm25 --data_dir DIR --dataset scifact --split test --k 100 --out run.trec.gz``
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from kalm_jax.data.beir import Doc, passage_text
from kalm_jax.data.trec import Run

log = logging.getLogger(__name__)

DOC_IDS_FILE = "doc_ids.json"


class BM25Index:
    """A bm25s index over a corpus, with the doc ids of its rows.

    Attributes:
      doc_ids: corpus doc id of each index row.
      retriever: the `bm25s.BM25` object.
    """

    def __init__(self, retriever: bm25s.BM25, doc_ids: list[str], language: str = "english",
                 stopwords: str | None = "en"):
        self.retriever = retriever
        self.doc_ids = doc_ids
        self.language = language
        self.stopwords = stopwords
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
        qids = list(queries)
        tokens = bm25s.tokenize([queries[q] for q in qids], stopwords=self.stopwords or [], stemmer=self._stemmer,
                                return_ids=False, show_progress=False)
        k = min(k, len(self.doc_ids))
        run: Run = {}
        empty = [q for q, t in zip(qids, tokens) if not t]
        if empty:
            log.warning("%d queries have no indexable term and get an empty ranking, e.g. %r", len(empty), empty[:3])
        keep = [i for i, t in enumerate(tokens) if t]
        if keep:
            rows, scores = self.retriever.retrieve([tokens[i] for i in keep], k=k, show_progress=show_progress,
                                                   n_threads=1)
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
        meta = json.loads(meta_path.read_text())
        retriever = bm25s.BM25.load(str(directory), allow_pickle=False, show_progress=False)
        n_rows = int(np.asarray(retriever.scores["num_docs"]))
        if n_rows != len(meta["doc_ids"]):
            raise ValueError(f"{directory}: index has {n_rows} documents but {DOC_IDS_FILE} lists {len(meta['doc_ids'])}")
        return cls(retriever, meta["doc_ids"], meta["language"], meta["stopwords"])


def bm25_run(corpus: Mapping[str, Doc | str], queries: Mapping[str, str], k: int = 100, **build_kwargs) -> Run:
    """Builds a `BM25Index` over `corpus` and returns the top-`k` run for `queries`."""
    return BM25Index.build(corpus, **build_kwargs).search(queries, k)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from kalm_jax.data.beir import load_beir
    from kalm_jax.data.trec import write_run

    p = argparse.ArgumentParser(description="BM25 top-k TREC run over a BEIR dataset (bm25s, stemmed).")
    p.add_argument("--data_dir", required=True, help="directory holding BEIR dataset folders")
    p.add_argument("--dataset", required=True, help="dataset folder name under --data_dir, e.g. scifact")
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--k1", type=float, default=0.9)
    p.add_argument("--b", type=float, default=0.4)
    p.add_argument("--out", required=True, help="run file to write (.trec or .trec.gz)")
    p.add_argument("--tag", default="bm25")
    p.add_argument("--on_missing", default="keep", choices=["raise", "keep", "drop"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    ds = load_beir(Path(args.data_dir) / args.dataset, args.split, on_missing=args.on_missing)
    run = BM25Index.build(ds.corpus, k1=args.k1, b=args.b).search(ds.queries, args.k)
    write_run(run, args.out, tag=args.tag)
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(ds.qrels, {"ndcg_cut.10", "recall.100"})
    per_query = evaluator.evaluate(run)
    ndcg = np.mean([m["ndcg_cut_10"] for m in per_query.values()])
    recall = np.mean([m["recall_100"] for m in per_query.values()])
    print(f"{args.dataset}/{args.split}: {len(run)} queries -> {args.out}; nDCG@10 {ndcg:.4f}, R@100 {recall:.4f}")


if __name__ == "__main__":
    main()
