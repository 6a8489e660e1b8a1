"""The MTEB adapter (`kalm_jax.mteb`), checked against eval.py, the `Reranker` and the released PyTorch wrapper.

- the nDCG@10 MTEB computes through `KaLMJaxReranker` on `local_task`s of two real datasets (scifact, adi) equals
  eval.py's on the same checkpoint, candidates and ratio to 1e-6, and MTEB's per-pair scores equal
  `Reranker.score` (tiny Hub-style checkpoint); each distinct document is encoded once per `predict`;
- the adapter's scores equal mteb's own PyTorch `KaLMRerankerWrapper` (transformers
  T5Gemma2ForConditionalGeneration, the released way) on the same DataLoaders to 1e-4;
- an instruction task puts the instruction in ``<Instruct>`` only (not appended to the query);
- a passage-state store makes a second run encode nothing; a non-finite score is a named error;
- the CLI writes MTEB's result files and reports an unknown task, or one whose data is not cached, in one line.
"""

from __future__ import annotations

import json
import shutil

import mteb
import numpy as np
import pytest
from mteb.models.search_wrappers import SearchCrossEncoderWrapper

from kalm_jax.evaluation import sweep
from kalm_jax.inference.reranker import Reranker
from kalm_jax.mteb import KaLMJaxReranker, NonFiniteScoreError, local_task

RATIO = 4
DOC_TOKENS, QUERY_TOKENS = 96, 32
QUERIES, TOP_K = 4, 8
DATASETS = ("scifact", "adi")
INSTRUCTION = "Given a question about documentation, find the abstracts that answer it."


@pytest.fixture(scope="module")
def reranker(hub_checkpoint):
    return Reranker.from_pretrained(
        hub_checkpoint[0],
        dtype="float32",
        ratio=RATIO,
        max_document_tokens=DOC_TOKENS,
        max_query_tokens=QUERY_TOKENS,
        show_progress=False,
    )


def _search(model, task):
    """MTEB's own cross-encoder search (SearchCrossEncoderWrapper) on a loaded task: {qid: {doc: score}}."""
    task.load_data()
    split = task.dataset["default"]["test"]
    wrapper = SearchCrossEncoderWrapper(model)
    kw = dict(task_metadata=task.metadata, hf_split="test", hf_subset="default")
    wrapper.index(split["corpus"], encode_kwargs={}, **kw)
    return wrapper.search(
        split["queries"], top_k=TOP_K, encode_kwargs={"batch_size": 32}, top_ranked=split["top_ranked"], **kw
    ), split


def test_mteb_ndcg_equals_eval_py_and_pair_scores_equal_reranker(hub_checkpoint, reranker, data_dir, tmp_path):
    hub, _ = hub_checkpoint
    eval_rows = sweep.run_sweep(
        {
            "checkpoint": str(hub),
            "data_dir": str(data_dir),
            "datasets": ",".join(DATASETS),
            "ratios": str(RATIO),
            "max_queries": QUERIES,
            "top_k": TOP_K,
            "max_document_tokens": DOC_TOKENS,
            "max_query_tokens": QUERY_TOKENS,
            "output_dir": str(tmp_path / "eval"),
            "progress": False,
            "report": False,
        }
    )
    eval_ndcg = {r["dataset"]: r["metrics"]["ndcg_cut_10"] for r in eval_rows if r["stage"] == "rerank"}

    model = KaLMJaxReranker(reranker)
    encoded = []
    real_encode = reranker.engine.encode_batch
    reranker.engine.encode_batch = lambda ids, *a, **k: encoded.append(len(ids)) or real_encode(ids, *a, **k)
    try:
        tasks = [local_task(data_dir, ds, top_k=TOP_K, max_queries=QUERIES) for ds in DATASETS]
        result = mteb.evaluate(
            model,
            tasks,
            cache=mteb.ResultCache(tmp_path / "mteb"),
            overwrite_strategy="always",
            prediction_folder=tmp_path / "pred",
            show_progress_bar=False,
        )
    finally:
        del reranker.engine.encode_batch
    by_task = {tr.task_name: tr.scores["test"][0] for tr in result.task_results}
    for ds in DATASETS:
        scores = by_task[f"KaLMLocal-{ds}"]
        assert abs(scores["ndcg_at_10_unrounded"] - eval_ndcg[ds]) <= 1e-6, (ds, scores, eval_ndcg[ds])
        assert abs(scores["ndcg_at_10"] - eval_ndcg[ds]) <= 5e-6 + 1e-12  # MTEB rounds its means to 5 decimals
        assert scores["main_score"] == scores["ndcg_at_10"]
    assert list((tmp_path / "mteb" / "results").rglob("KaLMLocal-scifact.json"))

    # one encoder row per distinct document of each predict call (one call per task)
    assert sum(encoded) == model.stats["encoded_documents"] == model.stats["distinct_documents"]
    assert model.stats["predict_calls"] == 2 and model.stats["pairs"] > model.stats["distinct_documents"]

    # per-pair scores: MTEB's predictions equal Reranker.score of the same texts
    task = tasks[0]
    task.load_data()  # MTEB unloads a task's data after evaluating it
    split = task.dataset["default"]["test"]
    texts = {
        d: (f"{t} {x}".strip() if t else x)
        for d, t, x in zip(split["corpus"]["id"], split["corpus"]["title"], split["corpus"]["text"])
    }
    queries = dict(zip(split["queries"]["id"], split["queries"]["text"]))
    pred = json.loads(next((tmp_path / "pred").glob("KaLMLocal-scifact*.json")).read_text())
    pred = pred["default"]["test"]
    assert set(pred) == set(queries)
    for q, docs in pred.items():
        ids = list(docs)
        want = reranker.score(queries[q], [texts[d] for d in ids])
        np.testing.assert_allclose([docs[d] for d in ids], want, atol=1e-6, rtol=0)
        assert ids == split["top_ranked"][q] or set(ids) == set(split["top_ranked"][q])


def test_scores_equal_the_released_pytorch_wrapper(hub_checkpoint, reranker, data_dir, tmp_path):
    """mteb's KaLMRerankerWrapper (transformers T5Gemma2ForConditionalGeneration: encoder, MEP ratio 4, full
    decoder forward, softmax of yes/no at the last position) and the adapter score MTEB's same DataLoaders."""
    from mteb.models.model_implementations.kalm_reranker import KaLMRerankerWrapper

    hub, _ = hub_checkpoint
    pt_dir = tmp_path / "pt"
    shutil.copytree(hub, pt_dir)  # AutoTokenizer needs the special tokens named; the fixture has tokenizer.json only
    (pt_dir / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"})
    )
    torch_model = KaLMRerankerWrapper(
        str(pt_dir),
        device="cpu",
        dtype="float32",
        query_max_length=QUERY_TOKENS,
        max_length=DOC_TOKENS,
        chunk_size=RATIO,
    )
    torch_model.mteb_model_meta = mteb.get_model_meta("KaLM-Embedding/KaLM-Reranker-V1-Nano")  # set by its loader
    task = local_task(data_dir, "adi", top_k=TOP_K, max_queries=QUERIES)
    want, _ = _search(torch_model, task)
    got, _ = _search(KaLMJaxReranker(reranker), task)
    pairs = [(q, d) for q in want for d in want[q]]
    assert len(pairs) == QUERIES * TOP_K
    np.testing.assert_allclose([got[q][d] for q, d in pairs], [want[q][d] for q, d in pairs], atol=1e-4, rtol=0)
    assert np.ptp([want[q][d] for q, d in pairs]) > 1e-3  # the random model does tell the pairs apart


def test_instruction_task_puts_the_instruction_in_instruct_only(reranker, data_dir):
    # queries long enough that an appended instruction would not be cut away
    reranker = Reranker(
        reranker.model,
        reranker.tokenizer,
        ratio=RATIO,
        max_document_tokens=DOC_TOKENS,
        max_query_tokens=256,
        show_progress=False,
    )
    task = local_task(data_dir, "adi", top_k=TOP_K, max_queries=2, instruction=INSTRUCTION)
    assert task.metadata.type == "InstructionReranking"
    seen = []
    real_prompt = reranker.engine.prompt_ids
    reranker.engine.prompt_ids = lambda q, ins=None, *a, **k: seen.append((q, ins)) or real_prompt(q, ins, *a, **k)
    try:
        got, split = _search(KaLMJaxReranker(reranker), task)
    finally:
        del reranker.engine.prompt_ids
    queries = dict(zip(split["queries"]["id"], split["queries"]["text"]))
    assert sorted(seen) == sorted((text, INSTRUCTION) for text in queries.values())  # raw query, instruction apart
    texts = dict(zip(split["corpus"]["id"], split["corpus"]["text"]))
    titles = dict(zip(split["corpus"]["id"], split["corpus"]["title"]))
    for q, docs in got.items():
        ids = list(docs)
        passages = [f"{titles[d]} {texts[d]}".strip() for d in ids]
        want = reranker.score(queries[q], passages, instruction=INSTRUCTION)
        np.testing.assert_allclose([docs[d] for d in ids], want, atol=1e-6, rtol=0)
        assert np.abs(reranker.score(queries[q], passages) - want).max() > 1e-6  # the instruction is used
        appended = reranker.score(f"{queries[q]} {INSTRUCTION}", passages, instruction=INSTRUCTION)
        assert np.abs(appended - want).max() > 1e-6  # and not appended to the query as MTEB's text column has it


def test_store_reuses_encodings_and_non_finite_scores_are_named(reranker, data_dir, tmp_path, monkeypatch):
    task = local_task(data_dir, "adi", top_k=TOP_K, max_queries=2)
    first = KaLMJaxReranker(reranker, store_dir=tmp_path / "store", encode_ratio=2)
    a, _ = _search(first, task)
    assert first.stats["encoded_documents"] == first.stats["distinct_documents"] > 0
    second = KaLMJaxReranker(reranker, store_dir=tmp_path / "store", encode_ratio=2)
    b, _ = _search(second, task)
    assert second.stats["encoded_documents"] == 0
    plain, _ = _search(KaLMJaxReranker(reranker), task)  # encoded at ratio 4 directly: exact re-pooling from 2
    for q in a:
        np.testing.assert_array_equal([a[q][d] for d in a[q]], [b[q][d] for d in a[q]])
        np.testing.assert_allclose([a[q][d] for d in a[q]], [plain[q][d] for d in a[q]], atol=1e-6, rtol=0)

    model = KaLMJaxReranker(reranker)
    monkeypatch.setattr(reranker.engine, "margins", lambda *a, **k: np.array([0.5, np.nan, 1.0], np.float32))
    with pytest.raises(NonFiniteScoreError, match="non-finite yes/no logits for 1 of 3 pairs"):
        model.score_pairs(["q"] * 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 queries for 1 documents"):
        model.score_pairs(["q", "r"], ["a"])
    with pytest.raises(ValueError, match="encode_ratio=3 must divide ratio=4"):
        KaLMJaxReranker(reranker, encode_ratio=3)
    assert not hasattr(model, "encode")  # MTEB checks the encoder protocol first
    meta = model.mteb_model_meta
    assert meta.framework == ["JAX"] and "cross-encoder" in meta.model_type


def test_cli_writes_mteb_results_and_names_an_unavailable_task(hub_checkpoint, data_dir, tmp_path, capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from kalm_jax.cli import mteb as mteb_cli

    # what the CLI sets (kalm_jax.cli.mteb.offline), restored after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)

    hub, _ = hub_checkpoint
    common = [
        f"--config.checkpoint={hub}",
        f"--config.data_dir={data_dir}",
        f"--config.output_dir={tmp_path}",
        "--config.dtype=float32",
        f"--config.max_document_tokens={DOC_TOKENS}",
        f"--config.max_query_tokens={QUERY_TOKENS}",
        "--config.max_queries=2",
        f"--config.top_k={TOP_K}",
    ]
    assert mteb_cli.main([*common, "--config.tasks=local:adi"]) == 0
    out = capsys.readouterr().out
    assert "KaLMLocal-adi\t" in out and "encoded" in out
    (result,) = (tmp_path / "results").rglob("KaLMLocal-adi.json")
    assert 0.0 <= json.loads(result.read_text())["scores"]["test"][0]["ndcg_at_10"] <= 1.0

    assert mteb_cli.main([*common, "--config.tasks=local:no-such-dataset"]) == 2
    assert "no-such-dataset" in capsys.readouterr().err
    assert mteb_cli.main([*common, "--config.tasks=NoSuchMtebTask"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: task 'NoSuchMtebTask'"), err
    # a named MTEB task is loaded from the Hugging Face cache only; without its data: one line, nothing downloaded
    assert mteb_cli.main([*common, "--config.tasks=SciFact"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: task 'SciFact': its data is not available offline"), err
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
