"""int8 passage states on the device (`InferenceEngine(device_states="int8")`): the score program takes int8
states + an fp32 scale per window and dequantizes them inside (each decoder layer, where it projects them); the
margins equal those of the same int8 states dequantized on the host (`PassageStates.dense`), bit for bit on the
CPU in fp32, through `margins` (host and device states) and `score_batch`; int8 travels to the devices; the
device cache takes about half of bf16's bytes; a tensor-split layout scores the same."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

from kalm_jax.inference import engine as engine_module
from kalm_jax.inference import programs
from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.inference.states import quantize_int8
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.model.t5gemma2 import dequantize_passages

TINY = get_preset("tiny")


def _engine(model, device_states="compute", **kw):
    return InferenceEngine(model, None, yes_id=5, no_id=6, show_progress=False, device_states=device_states, **kw)


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, seed=0)


@pytest.fixture(scope="module")
def engines(model):
    """(compute, int8) engines over the same fp32 weights and the 8 CPU devices."""
    return _engine(model, share_weights=False), _engine(model, "int8", share_weights=False)


@pytest.fixture(scope="module")
def cache(engines):
    """Ratio-1 float32 states of 19 passages of 5-89 tokens (real encoder states of the tiny model)."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 8000, int(n)).tolist() for n in rng.integers(5, 90, 19)]
    return engines[0].encode_ids(seqs, 1, storage="float32")


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(1)
    prompt_rows = [rng.integers(3, 8000, n).tolist() for n in (7, 12, 40)]
    return prompt_rows, rng.integers(0, 3, 24), rng.integers(0, 19, 24)


def test_quantizer_and_dequantizer_are_the_hosts(cache):
    """`to_storage("int8")` is `quantize_int8`; `dense()` is `dequantize_passages`; the jax.numpy twins give the
    same int8 values, scales and floats as numpy."""
    q = cache.to_storage("int8")
    values, scale = quantize_int8(cache.states)
    np.testing.assert_array_equal(q.states, values)
    np.testing.assert_array_equal(q.scale, scale)
    jv, js = quantize_int8(jnp.asarray(cache.states), xp=jnp)
    np.testing.assert_array_equal(np.asarray(jv), values)
    np.testing.assert_array_equal(np.asarray(js), scale)
    np.testing.assert_array_equal(np.asarray(dequantize_passages(jv, js, jnp.float32)), q.dense(np.float32))
    assert values.dtype == np.int8 and scale.dtype == np.float32 and np.abs(values).max() == 127


def test_int8_margins_equal_host_dequantized_bit_for_bit(engines, cache, pairs):
    """margins from int8 states on the device == margins from the same int8 states dequantized on the host, exactly
    (CPU, fp32): host `PassageStates` stored int8, float ones (quantized on the host by the same quantizer),
    `DeviceStates` from `place`, and `score_batch` (int8 + scale, or float quantized on the host)."""
    compute, int8 = engines
    prompt_rows, prompt_of, passage_of = pairs
    host = cache.to_storage("int8")
    want = compute.margins(prompt_rows, prompt_of, host.to_storage("float32"), passage_of, batch_size=32)
    assert np.isfinite(want).all() and np.ptp(want) > 0
    np.testing.assert_array_equal(int8.margins(prompt_rows, prompt_of, host, passage_of, batch_size=32), want)
    np.testing.assert_array_equal(int8.margins(prompt_rows, prompt_of, cache, passage_of, batch_size=32), want)
    placed = int8.place(host, batch_size=8)
    assert placed.states.dtype == jnp.int8 and placed.scale.dtype == jnp.float32
    assert placed.scale.sharding.is_fully_replicated
    np.testing.assert_array_equal(int8.margins(prompt_rows, prompt_of, placed, passage_of, batch_size=32), want)
    # a compute engine scores int8 device states as int8 too (the program takes what was placed)
    np.testing.assert_array_equal(compute.margins(prompt_rows, prompt_of, placed, passage_of, batch_size=32), want)

    rows = host.select(passage_of[:8], trim=False)
    dec = np.full((8, 40), 0, np.int32)
    dmask = np.zeros((8, 40), np.int32)
    for i, p in enumerate(prompt_of[:8]):
        dec[i, : len(prompt_rows[p])], dmask[i, : len(prompt_rows[p])] = prompt_rows[p], 1
    # score_batch's shapes are not margins' (no length sort, another window bucket): its own reference
    want = compute.score_batch(dec, dmask, rows.dense(np.float32), rows.mask)
    np.testing.assert_allclose(want, int8.margins(prompt_rows, prompt_of[:8], host, passage_of[:8]), atol=1e-5)
    np.testing.assert_array_equal(int8.score_batch(dec, dmask, rows.states, rows.mask, passage_scale=rows.scale), want)
    floats = cache.select(passage_of[:8], trim=False)
    np.testing.assert_array_equal(int8.score_batch(dec, dmask, floats.states, floats.mask), want)
    np.testing.assert_array_equal(
        compute.score_batch(dec, dmask, rows.states, rows.mask, passage_scale=rows.scale), want
    )
    with pytest.raises(ValueError, match="passage_scale goes with int8 passage states"):
        int8.score_batch(dec, dmask, floats.states, floats.mask, passage_scale=rows.scale)


def test_coarser_ratio_requantizes_on_the_device(engines, cache, pairs):
    """Scoring / placing at 2x the stored ratio re-pools on the device in fp32 and re-quantizes the pooled windows
    (int8 stays int8): the host's `to_ratio` (re-pool, re-quantize) up to the fp32 summation order, which can move
    a value across a rounding boundary: values within one int8 step (almost all equal), scales within 1e-6."""
    compute, int8 = engines
    prompt_rows, prompt_of, passage_of = pairs
    host = cache.to_storage("int8")
    ref = host.to_ratio(2)
    placed = int8.place(host, ratio=2, batch_size=8)
    assert placed.states.dtype == jnp.int8 and placed.ratio == 2
    c = ref.states.shape[1]
    values, scale = np.asarray(placed.states)[:, :c], np.asarray(placed.scale)[:, :c]
    assert np.abs(values.astype(np.int32) - ref.states).max() <= 1
    assert (values == ref.states).mean() > 0.999
    real = ref.mask.astype(bool)  # `place` zeroes windows past a row's end (value 0 either way)
    np.testing.assert_allclose(scale[real], ref.scale[real], rtol=1e-6)
    got = int8.margins(prompt_rows, prompt_of, host, passage_of, ratio=2, batch_size=32)
    np.testing.assert_array_equal(int8.margins(prompt_rows, prompt_of, placed, passage_of, batch_size=32), got)
    want = compute.margins(prompt_rows, prompt_of, ref.to_storage("float32"), passage_of)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2)


def test_int8_travels_and_the_program_dequantizes(engines, cache, pairs, monkeypatch):
    """What reaches the score program is int8 + fp32 scale (host batches transfer int8, half of bf16's bytes);
    its lowering takes int8 states [rows, C, H] and converts them to float inside. Fails if the engine dequantized
    on the host (float states would be transferred and be the program's argument)."""
    _, int8 = engines
    prompt_rows, prompt_of, passage_of = pairs
    text = int8.score_program(16, 40, 100).lower().as_text()
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    assert re.search(r"tensor<16x128x64xi8>", main) and re.search(r"tensor<16x128xf32>", main), main
    assert not re.search(r"tensor<16x128x64xf32>", main), main  # no float states argument
    # the int8 states are converted to float inside the program, by each decoder layer: the scanned layers' body
    # and the last layer (run apart, for the one query row) each convert them; no convert before the layers
    converts = re.findall(r"stablehlo\.convert %\S+ : \(tensor<16x128x64xi8>\) -> tensor<16x128x64xf32>", text)
    assert len(converts) >= 2, converts

    seen, put = [], int8._put

    def spy_put(*arrays):
        seen.extend(np.asarray(a).dtype for a in arrays if np.ndim(a) == 3)
        return put(*arrays)

    calls = []
    score = programs.score_pairs

    def spy_score(graphdef, state, dec, dmask, states, pmask, yes_no, scale=None):
        calls.append((states.dtype, None if scale is None else (scale.dtype, tuple(scale.shape)), tuple(states.shape)))
        return score(graphdef, state, dec, dmask, states, pmask, yes_no, scale)

    monkeypatch.setattr(int8, "_put", spy_put)
    monkeypatch.setattr(programs, "score_pairs", spy_score)
    int8.margins(prompt_rows, prompt_of, cache.to_storage("int8"), passage_of, batch_size=32)
    int8.margins(prompt_rows, prompt_of, cache, passage_of, batch_size=32)
    assert seen and set(seen) == {np.dtype(np.int8)}, seen
    assert calls and all(
        s == jnp.int8 and sc is not None and sc[0] == jnp.float32 and sc[1] == sh[:2] for s, sc, sh in calls
    )


def test_int8_device_cache_takes_about_half_of_bf16(cache):
    """`nbytes` of a bf16 engine's cache vs an int8 engine's (values + fp32 scale + mask): N x C x (H + 8) against
    N x C x (2H + 4); at the tiny model's H = 64, 0.55x; at large's 2,560, 0.50x."""
    bf16 = build_model(TINY, seed=0, param_dtype="bfloat16", dtype="bfloat16")
    host = cache.to_storage("int8")
    placed = {mode: _engine(bf16, mode, share_weights=False).place(host) for mode in ("compute", "int8")}
    n, c, h = len(cache), placed["int8"].states.shape[1], TINY.hidden_size
    assert placed["compute"].states.dtype == jnp.bfloat16 and placed["int8"].states.dtype == jnp.int8
    assert placed["compute"].nbytes == n * c * (2 * h + 4)
    assert placed["int8"].nbytes == n * c * (h + 4 + 4)
    assert placed["int8"].nbytes / placed["compute"].nbytes == pytest.approx((h + 8) / (2 * h + 4))
    assert (2560 + 8) / (2 * 2560 + 4) < 0.502


def test_tensor_split_layout_scores_the_same(model, engines, cache, pairs):
    """int8 states on a tensor:2 x data:4 layout (weights split over heads): the margins of the data-only layout."""
    _, int8 = engines
    prompt_rows, prompt_of, passage_of = pairs
    split = _engine(model, "int8", weights="tensor:2", share_weights=False)
    assert split.policy.mode == "tensor" and split.policy.tensor == 2
    host = cache.to_storage("int8")
    want = int8.margins(prompt_rows, prompt_of, host, passage_of, batch_size=32)
    np.testing.assert_allclose(
        split.margins(prompt_rows, prompt_of, host, passage_of, batch_size=32), want, rtol=1e-5, atol=1e-5
    )
    placed = split.place(host)
    np.testing.assert_allclose(
        split.margins(prompt_rows, prompt_of, placed, passage_of, batch_size=32), want, rtol=1e-5, atol=1e-5
    )


def test_setting_is_checked_and_shown(model, monkeypatch, capsys):
    with pytest.raises(ValueError, match="device_states must be one of compute, int8, got 'int4'"):
        _engine(model, "int4")
    monkeypatch.setattr(engine_module, "_ANNOUNCED", set())  # the start-up lines print once per process
    _engine(model, "int8", share_weights=False)
    assert "passage states on the devices: int8 + an fp32 scale per window (device_states=int8)" in (
        capsys.readouterr().err
    )
    _engine(model, share_weights=False)
    assert "passage states" not in capsys.readouterr().err
    assert "device_states=int8" in repr(_engine(model, "int8", share_weights=False))
    assert "device_states=compute" in repr(_engine(model, share_weights=False))
