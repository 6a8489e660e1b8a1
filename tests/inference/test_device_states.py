"""Device-resident passage states (`InferenceEngine.place` -> `DeviceStates`): the same margins as host states,
bounded compilation on the gather path, and clear errors for a wrong ratio, hidden size, index or engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kalm_jax.inference import programs
from kalm_jax.inference.engine import DeviceStates, InferenceEngine
from kalm_jax.inference.states import PassageStates
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def engine():
    return InferenceEngine(build_model(TINY, seed=0), None, yes_id=5, no_id=6, show_progress=False)


@pytest.fixture(scope="module")
def cache(engine):
    """Ratio-1 float32 states of 23 passages of 5-89 tokens."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 8000, int(n)).tolist() for n in rng.integers(5, 90, 23)]
    return engine.encode_ids(seqs, 1, storage="float32")


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(1)
    prompt_rows = [rng.integers(3, 8000, n).tolist() for n in (7, 12, 40)]
    return prompt_rows, rng.integers(0, 3, 50), rng.integers(0, 23, 50)


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_device_states_score_what_host_states_score(engine, cache, pairs, storage):
    host = cache.to_storage(storage)
    prompt_rows, prompt_of, passage_of = pairs
    for ratio in (1, 2):  # ratio 2: placed from the ratio-1 states, re-pooled on the device
        placed = engine.place(host, ratio=ratio, batch_size=8)
        assert isinstance(placed, DeviceStates) and placed.ratio == ratio and len(placed) == len(cache)
        assert placed.states.dtype == jnp.float32 and placed.states.shape[1] == 128 // ratio  # window bucket
        assert placed.states.sharding.is_fully_replicated
        assert placed.nbytes == 23 * (128 // ratio) * (TINY.hidden_size * 4 + 4)
        want = engine.margins(prompt_rows, prompt_of, host, passage_of, ratio=ratio, batch_size=16)
        got = engine.margins(prompt_rows, prompt_of, placed, passage_of, batch_size=16)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(placed.windows, -(-cache.mask.sum(axis=1) // 2))


def test_gather_runs_on_the_device_with_bounded_compilation(engine, cache, pairs, monkeypatch):
    prompt_rows, _, _ = pairs
    placed = engine.place(cache.select(np.arange(8)))
    longest = int(np.argmax(placed.windows))  # in every batch below: one window bucket
    monkeypatch.setattr(PassageStates, "select", lambda *a, **k: pytest.fail("host states read while scoring"))
    rng = np.random.default_rng(2)

    def run(sizes):
        before, gathers = engine.compiles, programs.gather_states._cache_size()
        for size in sizes:
            passage_of = rng.integers(0, 8, size)
            passage_of[0] = longest
            margins = engine.margins(prompt_rows[:1], np.zeros(size, np.int64), placed, passage_of, batch_size=size)
            assert margins.shape == (size,) and np.isfinite(margins).all()
        return engine.compiles - before, programs.gather_states._cache_size() - gathers

    sizes = [1, 2, 3, 5, 8, 13, 21, 30]
    buckets = {engine.rows(s) for s in sizes}  # (8, 16, 32 with the 8 test devices)
    total, gathers = run(sizes)
    assert gathers <= len(buckets) and total <= 2 * len(buckets), (gathers, total, buckets)  # a gather + a score each
    assert run([1, 2, 4, 6, 7, 11, 19, 27]) == (0, 0)  # other sizes in the same buckets reuse them


def test_bad_ratio_hidden_size_index_and_engine_are_refused(engine, cache, pairs):
    prompt_rows, prompt_of, passage_of = pairs
    placed = engine.place(cache, ratio=2)
    with pytest.raises(ValueError, match=r"placed at ratio 2, not 4: .*engine.place\(states, ratio=4\)"):
        engine.margins(prompt_rows, prompt_of, placed, passage_of, ratio=4)
    engine.margins(prompt_rows, prompt_of[:2], placed, passage_of[:2], ratio=2)  # the placed ratio is fine
    with pytest.raises(ValueError, match="cannot score at ratio 3 from states pooled at ratio 2"):
        engine.place(cache.repool(2), ratio=3)
    with pytest.raises(IndexError, match=r"passage_of holds indices outside \[0, 23\)"):
        engine.margins(prompt_rows, [0], placed, [23])
    odd = PassageStates(np.zeros((1, 1, 3), np.float32), np.ones((1, 1), np.int8), np.ones((1, 1), np.int32), 1)
    with pytest.raises(ValueError, match="hidden size 3, the model's is 64"):
        engine.place(odd)
    foreign = DeviceStates(jnp.zeros((1, 16, 3)), jnp.ones((1, 16), jnp.int32), np.ones(1, np.int64), 1)
    with pytest.raises(ValueError, match="hidden size 3"):
        engine.margins(prompt_rows, [0], foreign, [0])
    one = InferenceEngine(engine.model, None, devices=jax.local_devices()[:1], yes_id=5, no_id=6, share_weights=False)
    with pytest.raises(ValueError, match="placed on other devices"):
        one.margins(prompt_rows, [0], placed, [0])
