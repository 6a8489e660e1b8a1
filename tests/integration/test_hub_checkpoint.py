"""Every job on a Hub-style checkpoint (config.json + model.safetensors + tokenizer.json only), through the one
loader and the one inference engine.

- eval.py sweeps it, `label` labels with it, `Reranker` scores with it, and the three agree on the margins of
  the same (query, passage) pairs at the same ratio within 1e-5 (fp32);
- train.py fine-tunes from it with that tokenizer (no tokenizer is trained) and the result loads again;
- Reranker, store + sweep, dev eval and label reach the jitted encode / score functions only through the engine;
- on 8 devices a sweep holds exactly one copy of the weights per device.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import jax
import numpy as np
import pytest
from child_process import child_env

from kalm_jax.checkpoints import loader
from kalm_jax.data.training_jsonl import TrainingExample, read_training_jsonl, write_training_jsonl
from kalm_jax.data.trec import read_run
from kalm_jax.inference import programs
from kalm_jax.inference.reranker import Reranker
from kalm_jax.text.hf_json import HFTokenizer
from kalm_jax.training.label import label

REPO = Path(__file__).resolve().parents[2]
RATIO = 4
DOC_TOKENS, QUERY_TOKENS = 96, 32


def _env():
    return child_env()


@pytest.fixture(scope="module")
def mini_beir(tmp_path_factory, scifact_texts):
    """A BEIR dataset of 9 scifact passages and 2 queries, with a first-stage run listing every passage."""
    d = tmp_path_factory.mktemp("beir") / "mini"
    (d / "qrels").mkdir(parents=True)
    docs = {f"d{i}": scifact_texts[40 + i][: 80 + 40 * i] for i in range(9)}
    queries = {"q1": "What do white matter lesions in newborns show?", "q2": "Is myelodysplasia induced by cells?"}
    with gzip.open(d / "corpus.jsonl.gz", "wt") as f:
        for k, v in docs.items():
            f.write(json.dumps({"_id": k, "title": "", "text": v}) + "\n")
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\nq2\td3\t1\n")
    (d / "run.trec").write_text(
        "".join(f"{q} Q0 {k} {r + 1} {10.0 - r} bm25\n" for q in queries for r, k in enumerate(docs))
    )
    return d, docs, queries


def test_every_job_agrees_on_a_hub_checkpoint(hub_checkpoint, mini_beir, tmp_path):
    hub, _ = hub_checkpoint
    data, docs, queries = mini_beir
    ids = list(docs)
    texts = [docs[k] for k in ids]

    ckpt = loader.load(hub, dtype="float32")
    assert isinstance(ckpt.tokenizer, HFTokenizer) and ckpt.tokenizer.path.name == "tokenizer.json"

    rr = Reranker.from_pretrained(
        hub,
        dtype="float32",
        ratio=RATIO,
        max_document_tokens=DOC_TOKENS,
        max_query_tokens=QUERY_TOKENS,
        show_progress=False,
    )
    assert isinstance(rr.tokenizer, HFTokenizer)
    states = rr.encode_passages(texts, ratio=1)  # encoded once at ratio 1, scored at 4 (exact re-pooling)
    reranker = {q: rr.score(text, states, return_margin=True) for q, text in queries.items()}

    jsonl = tmp_path / "train.jsonl"
    write_training_jsonl(
        [TrainingExample(query=text, pos=[texts[0]], neg=texts[1:]) for text in queries.values()], jsonl
    )
    label(
        hub,
        jsonl,
        tmp_path / "labelled.jsonl",
        ratio=RATIO,
        fmt="logit",
        max_document_tokens=DOC_TOKENS,
        max_query_tokens=QUERY_TOKENS,
        show_progress=False,
    )
    labelled = {
        q: np.asarray(ex.pos_scores + ex.neg_scores)
        for q, ex in zip(queries, read_training_jsonl(tmp_path / "labelled.jsonl"))
    }

    out = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "eval.py"),
            f"--config.checkpoint={hub}",
            f"--config.data_dir={data.parent}",
            "--config.datasets=mini",
            f"--config.ratios={RATIO}",
            "--config.first_stage=run:run.trec",
            f"--config.max_document_tokens={DOC_TOKENS}",
            f"--config.max_query_tokens={QUERY_TOKENS}",
            f"--config.output_dir={out}",
            "--config.progress=False",
            "--config.report=False",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cell = next(r for r in rows if r["stage"] == "rerank")
    run = read_run(out / cell["run_file"])
    sweep = {q: np.asarray([run[q][k] for k in ids]) for q in queries}

    for q in queries:
        np.testing.assert_allclose(labelled[q], reranker[q], atol=1e-5, rtol=0)
        np.testing.assert_allclose(sweep[q], reranker[q], atol=1e-5, rtol=0)
        assert np.ptp(reranker[q]) > 1e-3  # the random model does tell the passages apart


def test_train_py_fine_tunes_from_a_hub_checkpoint_with_its_tokenizer_json(hub_checkpoint, data_dir, tmp_path):
    hub, _ = hub_checkpoint
    work = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "--config=configs/train.py:tiny",
            f"--workdir={work}",
            f"--config.init_from={hub}",
            "--config.epochs=0.004",
            "--config.checkpoint.every=2",
            "--config.eval.num_queries=0",
            "--config.data.batch_size=2",
            "--config.data.group_size=2",
            "--config.data.max_document_tokens=32",
            "--config.data.max_query_tokens=8",
            "--config.mep.ratios=(1,4)",
            "--config.optimizer.warmup_steps=1",
            f"--config.data.data_dir={data_dir}",
            "--config.tensorboard=False",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "tokenizer.json").read_bytes() == (hub / "tokenizer.json").read_bytes()
    assert not (work / "tokenizer.model").exists()  # the checkpoint's tokenizer, never a newly trained one
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert metrics and all(np.isfinite(m["loss"]) for m in metrics)
    import tensorflow_datasets as tfds

    info = tfds.builder_from_directory(str(next((work / "tfds").rglob("dataset_info.json")).parent)).info
    groups = info.splits["train"].num_examples
    assert metrics[-1]["step"] == int(np.ceil(0.004 * groups / 2)) >= 2  # one stage of 0.004 epochs
    trained = loader.load(work)
    assert isinstance(trained.tokenizer, HFTokenizer) and trained.config.vocab_size == 4096


def test_a_tokenizer_of_another_model_is_an_error(hub_checkpoint, tmp_path):
    from kalm_jax.text.spm import TokenizerError

    hub, _ = hub_checkpoint
    small = tmp_path / "small"
    from torch_reference import build_tiny_hf

    build_tiny_hf(small, vocab=512)
    (small / "tokenizer.json").write_bytes((hub / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError, match="4000 ids but the model's vocabulary has only 512"):
        loader.load(small)
    with pytest.raises(FileNotFoundError, match="pass tokenizer=PATH"):
        (small / "tokenizer.json").unlink()
        loader.load(small)


# ----------------------------------------------------------------------------------------- one engine
@pytest.fixture
def only_through_engine(monkeypatch):
    """Wraps the jitted encode / score / re-pool functions: every call must come from kalm_jax/inference/engine.py."""
    calls = {"encode_pool": 0, "score_pairs": 0, "repool_states": 0}
    engine_file = str(Path(programs.__file__).with_name("engine.py"))

    def wrap(name):
        real = getattr(programs, name)

        def checked(*a, **k):
            files = [f.filename for f in traceback.extract_stack()]
            assert engine_file in files, f"programs.{name} reached without the engine: {files[-4:]}"
            calls[name] += 1
            return real(*a, **k)

        checked._cache_size = real._cache_size
        monkeypatch.setattr(programs, name, checked)

    for name in calls:
        wrap(name)
    return calls


def test_clients_reach_the_jitted_functions_only_through_the_engine(
    hub_checkpoint, mini_beir, tmp_path, data_dir, only_through_engine, tokenizer
):
    from kalm_jax.evaluation import sweep
    from kalm_jax.training.dev_eval import DevSet

    hub, _ = hub_checkpoint
    data, docs, queries = mini_beir
    rr = Reranker.from_pretrained(hub, dtype="float32", max_document_tokens=DOC_TOKENS, show_progress=False)
    rr.score("a query", list(docs.values())[:3])
    assert only_through_engine["encode_pool"] and only_through_engine["score_pairs"]
    sweep.run_sweep(
        {
            "checkpoint": str(hub),
            "data_dir": str(data.parent),
            "datasets": "mini",
            "ratios": "1,4",
            "first_stage": "run:run.trec",
            "max_document_tokens": DOC_TOKENS,
            "output_dir": str(tmp_path / "o"),
            "progress": False,
            "report": False,
        }
    )
    jsonl = tmp_path / "t.jsonl"
    write_training_jsonl([TrainingExample(query="q", pos=["a passage"], neg=["another one"])], jsonl)
    label(hub, jsonl, tmp_path / "l.jsonl", show_progress=False)
    dev = DevSet.build(
        data,
        "test",
        rr.tokenizer,
        num_queries=2,
        depth=3,
        max_document_tokens=DOC_TOKENS,
        max_query_tokens=QUERY_TOKENS,
    )
    assert 0.0 <= dev.evaluate(rr.model, rr.tokenizer, ratio=4)["dev_ndcg@10"] <= 1.0
    rr.score("a query", rr.encode_passages(list(docs.values())[:3], ratio=1))  # re-pooled on the device
    assert only_through_engine["repool_states"] > 0


def test_a_sweep_holds_one_copy_of_the_weights_per_device(hub_checkpoint, mini_beir, tmp_path, monkeypatch):
    from kalm_jax.evaluation import rerank, sweep

    hub, _ = hub_checkpoint
    data, _, _ = mini_beir
    assert len(jax.local_devices()) == 8
    seen = []
    real = rerank.rerank

    def buffers(shape, dtype):
        """Distinct device buffers per device of live arrays of this shape (the embedding's is unique)."""
        gc.collect()
        out = {d: set() for d in jax.local_devices()}
        for arr in jax.live_arrays():
            if arr.shape == shape and arr.dtype == dtype:
                for shard in arr.addressable_shards:
                    out[shard.device].add(shard.data.unsafe_buffer_pointer())
        return out

    def snapshot(engine, *a, **k):
        emb = engine.model.embedding.get_value()
        during = buffers(emb.shape, emb.dtype)
        seen.append({d: len(during[d] - before[d]) for d in during})
        return real(engine, *a, **k)

    before = buffers((4096, 64), np.dtype(np.float32))

    monkeypatch.setattr(rerank, "rerank", snapshot)
    sweep.run_sweep(
        {
            "checkpoint": str(hub),
            "data_dir": str(data.parent),
            "datasets": "mini",
            "ratios": "4",
            "first_stage": "run:run.trec",
            "max_document_tokens": DOC_TOKENS,
            "output_dir": str(tmp_path / "o"),
            "progress": False,
            "report": False,
        }
    )
    assert seen and all(set(s.values()) == {1} for s in seen), seen


def test_rerun_with_a_replaced_checkpoint_or_changed_data_refuses(hub_checkpoint, mini_beir, tmp_path):
    import shutil

    from kalm_jax.evaluation import sweep

    ck = tmp_path / "ckpt"
    shutil.copytree(hub_checkpoint[0], ck)
    data = tmp_path / "data"
    shutil.copytree(mini_beir[0].parent, data)
    cfg = {
        "checkpoint": str(ck),
        "data_dir": str(data),
        "datasets": "mini",
        "ratios": "4",
        "first_stage": "run:run.trec",
        "max_document_tokens": DOC_TOKENS,
        "output_dir": str(tmp_path / "o"),
        "progress": False,
        "report": False,
    }
    rows = sweep.run_sweep(cfg)
    assert all(r["data_identity"] for r in rows) and rows[-1]["checkpoint_identity"]
    assert sweep.run_sweep(cfg) == rows  # unchanged inputs: resumes, nothing to do
    os.utime(ck / "model.safetensors", ns=(1, 1))  # the checkpoint replaced at the same path
    with pytest.raises(sweep.SweepConfigError, match=r"checkpoint .*ckpt: replaced since"):
        sweep.run_sweep({**cfg, "ratios": "4,8"})
    shutil.rmtree(ck)
    shutil.copytree(hub_checkpoint[0], ck, copy_function=shutil.copy2)
    shutil.copystat(hub_checkpoint[0], ck)
    qrels = data / "mini" / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text().replace("q2\td3\t1", "q2\td4\t1"))  # the data changed under one name
    with pytest.raises(sweep.SweepConfigError, match="dataset 'mini': its files changed"):
        sweep.run_sweep({**cfg, "ratios": "4,8"})
    assert sweep.read_results(tmp_path / "o") == rows  # nothing was added or lost
