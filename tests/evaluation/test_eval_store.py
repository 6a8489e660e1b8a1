"""PassageStore: encoded once and reused, exact re-pooling, stale-store detection, storage options, and scores
through the store equal to scores computed from text."""

from __future__ import annotations

import numpy as np
import pytest
from child_process import child_env

from kalm_jax.data.beir import load_beir
from kalm_jax.evaluation import rerank
from kalm_jax.evaluation import store as store_lib
from kalm_jax.inference import programs, scoring
from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.text import prompts

MAX_LEN = 96


@pytest.fixture(scope="module")
def scifact(data_dir):
    return load_beir(data_dir / "scifact", "test")


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=5)


@pytest.fixture(scope="module")
def texts(scifact):
    ids = list(scifact.corpus)[:40]
    return {d: scifact.passage(d) for d in ids}


@pytest.fixture
def count_encoder(monkeypatch):
    calls = {"n": 0, "rows": 0}
    real = programs.encode_pool

    def counting(graphdef, state, ids, mask, ratio):
        calls["n"] += 1
        return real(graphdef, state, ids, mask, ratio)

    monkeypatch.setattr(programs, "encode_pool", counting)
    return calls


def _engine(model, tokenizer, max_len=MAX_LEN):
    return InferenceEngine(model, tokenizer, max_document_tokens=max_len, show_progress=False)


def _key(model, tokenizer, storage="float32", ratio=1):
    return store_lib.StoreKey.for_engine(_engine(model, tokenizer), ratio, storage)


def test_written_once_then_reused_and_extended(tmp_path, model, tokenizer, texts, count_encoder):
    ids = list(texts)
    st = store_lib.PassageStore.open(tmp_path / "s", _key(model, tokenizer))
    assert st.ensure(_engine(model, tokenizer), texts, ids[:30], batch_size=8, shard_size=16, progress=False) == 30
    assert count_encoder["n"] == 4 and len(st.shards) == 2
    calls = count_encoder["n"]
    again = store_lib.PassageStore.open(tmp_path / "s", _key(model, tokenizer))
    assert len(again) == 30 and again.ensure(_engine(model, tokenizer), texts, ids[:30], progress=False) == 0
    again.lookup(ids[:30], 4)  # coarser ratios come from re-pooling, not the encoder
    assert count_encoder["n"] == calls
    assert again.ensure(_engine(model, tokenizer), texts, ids, batch_size=8, progress=False) == 10  # only the new ones
    assert count_encoder["n"] == calls + 2 and len(again.shards) == 3
    assert store_lib.PassageStore.open(tmp_path / "s", _key(model, tokenizer)).missing(ids) == []


def test_repooled_states_equal_directly_pooled(tmp_path, model, tokenizer, texts):
    ids = list(texts)
    st = store_lib.PassageStore.open(tmp_path / "s", _key(model, tokenizer))
    st.ensure(_engine(model, tokenizer), texts, ids, batch_size=16, shard_size=25, progress=False)
    tok, mask = prompts.tokenize_documents(tokenizer, [texts[d] for d in ids], MAX_LEN)
    order = ids[::-1]  # lookup order differs from storage order and crosses shards
    for ratio in (4, 8):
        got = st.lookup(order, ratio)
        direct, dmask, dcounts = scoring.encode_passages(model, tok, mask, ratio)
        rows = [ids.index(d) for d in order]
        width = got.mask.shape[1]
        assert width == int(dmask[rows].sum(0).nonzero()[0].max()) + 1
        np.testing.assert_array_equal(got.mask, dmask[rows][:, :width])
        np.testing.assert_array_equal(got.counts, dcounts[rows][:, :width])
        np.testing.assert_allclose(got.dense(), direct[rows][:, :width] * dmask[rows][:, :width, None], atol=2e-5)
        assert got.ids == order
    assert (tmp_path / "s" / "r8" / "shard-00001" / "manifest.json").is_file()  # derived shards are saved


def test_stale_store_is_an_error_or_a_reencode(tmp_path, model, tokenizer, texts, count_encoder):
    ids = list(texts)[:8]
    st = store_lib.PassageStore.open(tmp_path / "s", _key(model, tokenizer))
    st.ensure(_engine(model, tokenizer), texts, ids, progress=False)
    other = build_model(get_preset("tiny"), seed=6)
    with pytest.raises(store_lib.StaleStoreError, match=r"model: stored '[0-9a-f]+', now '[0-9a-f]+'"):
        store_lib.PassageStore.open(tmp_path / "s", _key(other, tokenizer))
    with pytest.raises(store_lib.StaleStoreError, match="max_length: stored 96, now 64"):
        store_lib.PassageStore.open(tmp_path / "s", store_lib.StoreKey.for_engine(_engine(model, tokenizer, 64), 1))
    fresh = store_lib.PassageStore.open(tmp_path / "s", _key(other, tokenizer), on_stale="reencode")
    assert len(fresh) == 0
    assert fresh.ensure(_engine(other, tokenizer), texts, ids, progress=False) == 8
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and has no manifest.json"):
        store_lib.PassageStore.open(tmp_path / "junk", _key(model, tokenizer))
    assert (tmp_path / "junk" / "x.txt").read_text() == "mine"


def test_storage_options_shrink_the_cache(tmp_path, model, tokenizer, texts):
    ids = list(texts)[:16]
    out = {}
    for storage in ("float32", "bfloat16", "int8"):
        st = store_lib.PassageStore.open(tmp_path / storage, _key(model, tokenizer, storage))
        st.ensure(_engine(model, tokenizer), texts, ids, progress=False)
        out[storage] = (st.sizes(4), st.lookup(ids, 4).dense())
    f32, bf16, i8 = (out[k][0]["state_bytes_per_passage"] for k in ("float32", "bfloat16", "int8"))
    assert bf16 < 0.55 * f32 and i8 < 0.35 * f32
    assert out["float32"][0]["bytes"] > out["bfloat16"][0]["bytes"] > out["int8"][0]["bytes"]
    ref = out["float32"][1]
    scale = np.abs(ref).max()
    assert np.abs(out["bfloat16"][1] - ref).max() < 1e-2 * scale
    assert np.abs(out["int8"][1] - ref).max() < 2e-2 * scale


def test_scores_through_the_store_equal_scores_from_text(tmp_path, model, tokenizer, texts, scifact):
    queries = dict(list(scifact.queries.items())[:2])
    ids = list(texts)[:12]
    run = {q: {d: float(-i) for i, d in enumerate(ids)} for q in queries}
    st = store_lib.PassageStore.open(tmp_path / "s", _key(model, tokenizer))
    st.ensure(_engine(model, tokenizer), texts, ids, batch_size=5, progress=False)
    tok, mask = prompts.tokenize_documents(tokenizer, [texts[d] for d in ids], MAX_LEN)
    for ratio in (4,):  # stored at ratio 1, re-pooled to 4
        got = rerank.rerank_run(_engine(model, tokenizer), queries, run, st, ratio, batch_pairs=16)
        states, smask, _ = scoring.encode_passages(model, tok, mask, ratio)
        for q, text in queries.items():
            dec, dmask = prompts.tokenize_decoder_prompts(tokenizer, [text] * len(ids))
            direct = scoring.score(model, dec, dmask, states, smask, tokenizer.yes_id, tokenizer.no_id)
            np.testing.assert_allclose([got[q][d] for d in ids], direct, atol=5e-5, rtol=0)
            assert np.ptp(direct) > 1e-3  # the random model does tell passages apart


WRITER = r"""
import json, sys, time
from pathlib import Path
from kalm_jax.model.config import get_preset
from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.evaluation import store as store_lib
from kalm_jax.model.build import build_model
from kalm_jax.text.spm import Tokenizer

root, tok, texts_file, lo, hi, me, other = sys.argv[1:]
texts = json.loads(Path(texts_file).read_text())
ids = list(texts)[int(lo):int(hi)]
engine = InferenceEngine(build_model(get_preset("tiny"), seed=5), Tokenizer.load(tok), max_document_tokens=96,
                         show_progress=False)
st = store_lib.PassageStore.open(root, store_lib.StoreKey.for_engine(engine, 1))
Path(me).touch()  # both writers have opened the store (same empty manifest) before either encodes
deadline = time.time() + 300
while not Path(other).exists() and time.time() < deadline:
    time.sleep(0.05)
print("encoded", st.ensure(engine, texts, ids, batch_size=8, shard_size=8, progress=False), flush=True)
"""


def test_two_concurrent_writers_leave_every_passage_exactly_once(tmp_path, tokenizer, texts, model):
    """Two processes (two sweeps sharing a store_dir) open one store, then encode overlapping candidate sets at
    the same time: both succeed (one waits for the store lock), and the manifest names every passage of both
    sets exactly once, in shards that exist and load."""
    import json
    import subprocess
    import sys

    (tmp_path / "texts.json").write_text(json.dumps(texts))
    root = tmp_path / "store"
    env = child_env(devices=1)
    ranges = [(0, 26), (14, 40)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(root),
                str(tokenizer.path),
                str(tmp_path / "texts.json"),
                str(lo),
                str(hi),
                str(tmp_path / f"ready{i}"),
                str(tmp_path / f"ready{1 - i}"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, (lo, hi) in enumerate(ranges)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    manifest = json.loads((root / "manifest.json").read_text())
    listed = []
    for shard in manifest["shards"]:
        d = root / "r1" / shard["name"]
        ids = json.loads((d / "ids.json").read_text())
        assert len(ids) == shard["count"] and (d / "states.npy").is_file()
        listed += ids
    assert sorted(listed) == sorted(texts) and len(listed) == len(set(listed)) == 40
    encoded = sorted(int(o[0].split()[-1]) for o in outs)
    assert sum(encoded) == 40, encoded  # the overlap is encoded once: the second writer reads the first's shards
    st = store_lib.PassageStore.open(root, _key(model, tokenizer))
    assert st.missing(list(texts)) == [] and st.lookup(list(texts), 1).ids == list(texts)
