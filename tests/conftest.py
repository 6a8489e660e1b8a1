"""Shared fixtures: the real BEIR data directory and a SentencePiece model trained on scifact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kalm_jax.data.beir import load_corpus, passage_text
from kalm_jax.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("KALM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    assert (path / "scifact").is_dir(), f"BEIR data not found at {path}; set KALM_DATA_DIR"
    return path


@pytest.fixture(scope="session")
def scifact_texts(data_dir) -> list[str]:
    corpus = load_corpus(data_dir / "scifact" / "corpus.jsonl.gz")
    return [passage_text(d) for d in list(corpus.values())[:3000]]


@pytest.fixture(scope="session")
def tokenizer(scifact_texts, tmp_path_factory) -> Tokenizer:
    return Tokenizer.train(scifact_texts, tmp_path_factory.mktemp("spm"), vocab_size=4000)


@pytest.fixture(scope="session")
def scifact_index(data_dir):
    from kalm_jax.data.bm25 import BM25Index

    return BM25Index.build(load_corpus(data_dir / "scifact" / "corpus.jsonl.gz"), show_progress=False)
