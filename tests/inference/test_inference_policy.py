"""The inference mesh policy (`kalm_jax.parallel.inference_policy`): the decision against independent byte counts, the
setting's overrides, and the tensor layout on 8 CPU devices (same results as replicated weights, no weight
all-gathered in a call)."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.model.attention import dispatch
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.model.options import ModelOptions
from kalm_jax.model.t5gemma2 import count_params
from kalm_jax.parallel import inference_policy as ip

GiB = 2**30


def _state(preset: str, dtype: str = "bfloat16"):
    return nnx.split(build_model(get_preset(preset), param_dtype=dtype, abstract=True))[1]


def _decide(preset: str, devices: int, memory, setting=None, rows: int = 2048, scores: bool = True):
    return ip.decide(
        get_preset(preset),
        _state(preset),
        devices=devices,
        rows=rows,
        document_len=512,
        prompt_len=128,
        dtype="bfloat16",
        memory=memory,
        setting=setting,
        scores=scores,
    )


def test_weight_bytes_match_the_parameter_count():
    """Replicated: every parameter at 2 bytes (count_params, an independent walk of the state); tensor 4:
    every matrix of the stacks and the embedding split 4 ways, only the norms and the single kv head whole."""
    cfg = get_preset("large")
    params = sum(count_params(build_model(cfg, abstract=True)).values())
    assert ip.weight_bytes(_state("large"), 1) == 2 * params
    quarter = ip.weight_bytes(_state("large"), 4)
    assert 2 * params / 4 <= quarter < 2 * params / 4 * 1.01  # large: 4 kv heads, so k / v split as well
    nano = sum(count_params(build_model(get_preset("nano"), abstract=True)).values())
    # nano's single kv head stays whole: [layers, 640, 1, 256] k and v per stack
    kv = 2 * 2 * 18 * 640 * 256 * 2
    assert ip.weight_bytes(_state("nano"), 2) == pytest.approx((2 * nano - kv) / 2 + kv, rel=1e-3)


def test_policy_replicates_what_fits_and_splits_what_does_not():
    """nano (0.54 GB of bf16 weights) stays replicated on v5e chips; large (14.2 GB) does not fit a 16 GiB
    chip replicated and is split over the smallest tensor size that fits; unknown memory: replicated."""
    nano = _decide("nano", 16, 16 * GiB)
    assert (nano.mode, nano.data, nano.tensor) == ("replicated", 16, 1)
    large = _decide("large", 16, 16 * GiB, rows=16)  # one row per chip
    assert large.mode == "tensor" and large.tensor > 1 and large.data * large.tensor == 16
    assert large.weight_bytes + large.working_bytes <= ip.FILL * 16 * GiB
    smaller = _decide("large", 16, 16 * GiB, setting=f"tensor:{large.tensor // 2}", rows=16)
    assert smaller.weight_bytes + smaller.working_bytes > ip.FILL * 16 * GiB  # the next smaller split does not fit
    # 2048 rows of 512 tokens fit beside no split on 16 GiB chips, 1024 do at tensor 2: the fewest collectives
    big = _decide("large", 16, 16 * GiB)
    assert (big.tensor, big.data, big.rows, big.asked) == (2, 8, 1024, 2048)
    assert big.weight_bytes + big.working_bytes <= ip.FILL * 16 * GiB
    assert "fits at tensor=2, the fewest collectives" in big.describe()
    # 2 GiB chips: not even MIN_TOKENS per batch shard fits at any size: the weights get at most half of the
    # budget where a size allows it, else the largest size (large: 8, its query heads)
    tight = _decide("large", 16, 2 * GiB)
    assert (tight.tensor, tight.rows) == (8, 2048) and "fit at no tensor size" in tight.describe()
    assert _decide("large", 8, 95 * GiB).mode == "replicated"  # a v5p chip holds it
    assert _decide("large", 8, None).mode == "replicated"  # CPU: memory unknown
    assert "weights split over tensor" in large.describe() and "GiB" in large.describe()


def test_policy_caps_the_batch_to_keep_the_weights_replicated():
    """large on v6e-8 (32 GiB chips) with the einsum attention: 2048 rows of 512 tokens fit beside replicated
    weights at no size, 1024 do (128 per chip, the largest power of two that does), so the weights stay
    replicated at that batch; a cap below `MIN_TOKENS` document tokens per chip is not taken (a split with its
    own cap instead), nor is one on v5e-16, where the weights alone overfill the budget; set layouts keep the
    batch asked for."""
    got = _decide("large", 8, 32 * GiB)
    assert (got.mode, got.data, got.rows, got.asked) == ("replicated", 8, 1024, 2048)
    assert got.weight_bytes + got.working_bytes <= ip.FILL * 32 * GiB
    doubled = _decide("large", 8, 32 * GiB, setting="replicated", rows=2048)
    assert doubled.weight_bytes + doubled.working_bytes > ip.FILL * 32 * GiB
    assert "batch 1024 (of 2048 asked)" in got.describe() and "no call runs a collective" in got.describe()
    assert _decide("large", 8, 32 * GiB, rows=1024).rows == 1024  # fits as asked: nothing capped
    assert _decide("large", 8, 32 * GiB, setting="tensor:2").rows == 2048
    assert _decide("large", 16, 16 * GiB).mode == "tensor"
    # 18 GiB chips: the weights leave room for fewer than MIN_TOKENS / 512 = 32 rows per chip, too few to cap to
    least = ip.MIN_TOKENS // 512
    ws = ip.working_set_bytes(get_preset("large"), "bfloat16", least, 512, 128)
    assert (
        got.weight_bytes + ws
        > ip.FILL * 18 * GiB
        >= got.weight_bytes + ip.working_set_bytes(get_preset("large"), "bfloat16", least // 2, 512, 128)
    )
    small_chips = _decide("large", 8, 18 * GiB)
    assert (small_chips.mode, small_chips.tensor, small_chips.rows) == ("tensor", 2, 512)


def test_a_fused_attention_kernel_leaves_the_scores_out_of_the_working_set():
    """The splash kernel (TPU) and cuDNN flash attention keep the scores on chip, the einsum paths write them:
    without the scores' fp32 block the estimate drops by exactly it, and large on v6e-8 stays replicated at
    the 2048 rows per call asked for (256 per chip) instead of 1024 (the compiler's own figure for that
    program: 15.4 GiB of 32 with the encoder's weights, 21.4 with the decoder's too,
    benchmarks/2026-12-05-tpu-layer-scan-weight-copy.md)."""
    on_chip = functools.partial(dispatch.scores_stay_on_chip, dtype=jnp.bfloat16, head_dim=256, softcap=None)
    assert on_chip("auto", tpu="flash", platform="tpu") and on_chip("tpu_flash", tpu="flash", platform="cpu")
    assert not on_chip("auto", tpu="flash", platform="cpu")  # the einsum reference on CPU
    assert not on_chip("auto", tpu="xla", platform="tpu") and not on_chip("xla", tpu="flash", platform="tpu")
    assert not dispatch.scores_stay_on_chip("auto", jnp.bfloat16, 256, 50.0, tpu="flash", platform="tpu")  # softcap
    large = get_preset("large")
    scores = 64 * 512 * large.num_heads * 512 * 4  # 64 rows of 512 tokens, one 512-query block of fp32 scores
    assert (
        ip.working_set_bytes(large, "bfloat16", 64, 512, 128)
        - ip.working_set_bytes(large, "bfloat16", 64, 512, 128, scores=False)
        == scores
    )
    kernel = _decide("large", 8, 32 * GiB, scores=False)
    assert (kernel.mode, kernel.rows, kernel.asked) == ("replicated", 2048, 2048)
    assert kernel.weight_bytes + kernel.working_bytes <= ip.FILL * 32 * GiB
    assert _decide("large", 8, 32 * GiB).rows == 1024  # the einsum attention's scores: 2048 would not fit


def test_the_working_set_splits_the_encoders_tokens_under_sequence_parallelism():
    """Under tensor 4 the engine's encoder holds a quarter of the tokens in its residual stream, norms and adds
    (4 x H per token) and of its fp32 final states, and adds each sub-block's gathered input and partial sums
    over every token (2 x H): the estimate drops by exactly that. Where 4 does not divide the tokens, or the
    activations are int8 (their per-token scale spans every channel), the encoder keeps whole tokens, and the
    engine tells the policy so."""
    large = get_preset("large")
    h, tokens = large.hidden_size, 512 * 512
    int8 = ModelOptions(activations="int8")
    whole = ip.working_set_bytes(large, "bfloat16", 512, 512, 128, 4, False, int8)
    split = ip.working_set_bytes(large, "bfloat16", 512, 512, 128, 4, False)
    assert whole - split == tokens * (4 * h - (4 * h // 4 + 2 * h)) * 2 + tokens * h * 4 * 3 // 4
    assert ip.working_set_bytes(large, "bfloat16", 512, 510, 128, 4, False) == ip.working_set_bytes(
        large, "bfloat16", 512, 510, 128, 4, False, int8
    )
    engines = {
        mode: _abstract_engine("large", 2048, weights="tensor:4", device_memory=16 * GiB, quantization=mode)
        for mode in ("int8", "int8-dynamic")
    }
    rows = 2048 // 2  # per batch shard: 8 devices, tensor 4
    for mode, activations in (("int8", "float"), ("int8-dynamic", "int8")):
        assert engines[mode].policy.working_bytes == ip.working_set_bytes(
            large, "bfloat16", rows, 512, 128, 4, True, ModelOptions(activations=activations)
        ), mode


def _abstract_engine(preset: str, batch_size: int, **overrides) -> InferenceEngine:
    """An engine over 8 devices of 32 GiB (`overrides`: other engine arguments) for an abstract bf16 `preset`
    (nothing is placed)."""
    return InferenceEngine(
        build_model(get_preset(preset), abstract=True, param_dtype="bfloat16", dtype="bfloat16"),
        devices=jax.devices()[:8],
        batch_size=batch_size,
        max_document_tokens=512,
        max_prompt_tokens=128,
        yes_id=1,
        no_id=2,
        **{"device_memory": 32 * GiB, "show_progress": False, **overrides},
    )


def _batches(engine: InferenceEngine, n: int, batch_size: int) -> list[tuple[int, int]]:
    spans = []
    engine.run_batches(n, batch_size, lambda start, stop: spans.append((start, stop)), "test", "doc", False)
    return spans


def test_the_engine_runs_the_capped_batch():
    """An engine over 8 devices of 32 GiB, asked for batches of 2048, builds its programs at the policy's 1024
    rows (abstract large: nothing is placed; the einsum attention of CPU devices), and a call asking for more
    rows than that runs at most 1024 per batch; an engine the policy did not cap keeps a call's larger batch."""
    engine = _abstract_engine("large", 2048)
    assert engine.policy.mode == "replicated" and engine.batch_size == engine.policy.rows == 1024
    assert _batches(engine, 2500, 2048) == [(0, 1024), (1024, 2048), (2048, 2500)]
    assert _batches(engine, 300, 256) == [(0, 256), (256, 300)]
    uncapped = _abstract_engine("nano", 64)
    assert uncapped.policy.rows == uncapped.policy.asked == 64
    assert _batches(uncapped, 300, 256) == [(0, 256), (256, 300)]


def test_policy_setting_overrides(monkeypatch):
    assert _decide("nano", 16, 16 * GiB, setting="tensor:4").tensor == 4
    assert _decide("large", 16, 16 * GiB, setting="replicated").mode == "replicated"
    monkeypatch.setenv(ip.WEIGHTS_ENV, "tensor:2")
    assert _decide("nano", 16, 16 * GiB).tensor == 2
    assert _decide("nano", 16, 16 * GiB, setting="auto").mode == "replicated"  # the argument wins
    for bad in ("sharded", "tensor:x", "replicated:2", "tensor:0"):
        with pytest.raises(ValueError, match="inference weights setting"):
            _decide("nano", 16, 16 * GiB, setting=bad)
    with pytest.raises(ValueError, match="must divide"):
        _decide("nano", 16, 16 * GiB, setting="tensor:8")  # nano has 4 query heads


def _tiny4():
    """tiny with 4 query heads over 2 kv heads, so tensor 2 splits both (MLP width 96: no weight has an
    activation's shape)."""
    return dataclasses.replace(get_preset("tiny"), num_heads=4, num_kv_heads=2, intermediate_size=96)


def test_tensor_layout_matches_replicated_and_gathers_no_weight():
    """On 8 CPU devices: tensor 2 and 4 give the replicated engine's states and margins (fp32 rounding), every
    matrix is split, and the compiled encode and score programs gather no weight per call: score all-reduces its
    activations and gathers nothing, encode (sequence parallel) reduce-scatters them and gathers only activations
    (`tests/model/test_sequence_parallel.py`)."""
    assert len(jax.devices()) == 8
    model = build_model(_tiny4(), param_dtype="float32")
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 8000, (8, 40)).astype(np.int32)
    lengths = rng.integers(5, 41, 8)
    mask = (np.arange(40)[None] < lengths[:, None]).astype(np.int32)
    dec = rng.integers(10, 8000, (8, 20)).astype(np.int32)
    results = {}
    for setting in ("replicated", "tensor:2", "tensor:4"):
        engine = InferenceEngine(model, devices=jax.devices(), yes_id=1, no_id=2, weights=setting, share_weights=False)
        states, smask, _ = engine.encode_batch(ids, mask, 4)
        margins = engine.score_batch(dec, np.ones_like(dec), states, smask)
        results[setting] = (states, margins)
        if setting == "replicated":
            assert dict(engine.mesh.shape) == {"data": 8}
            continue
        t = int(setting[-1])
        assert dict(engine.mesh.shape) == {"data": 8 // t, "fsdp": 1, "tensor": t}
        q = engine._state["encoder"]["q"].get_value()
        assert q.sharding.shard_shape(q.shape)[2] == q.shape[2] // t  # heads split
        weights = {tuple(a.shape[1:]) for a in jax.tree.leaves(engine._state)}
        weights |= {tuple(a.shape) for a in jax.tree.leaves(engine._state)}
        encode = engine.encode_program(8, 40, 4).lower().compile().as_text()
        gathered = re.findall(r"= \(?\w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", encode)
        assert gathered and not weights & {tuple(int(d) for d in g.split(",") if d) for g in gathered}
        assert "reduce-scatter" in encode  # the sequence-parallel reductions are there
        score = engine.score_program(8, 20, 10).lower().compile().as_text()
        assert not re.search(r"\ball-gather(-start)?\(", score)
        assert "all-reduce" in score  # the Megatron-style reductions are there
    ref_states, ref_margins = results["replicated"]
    for setting in ("tensor:2", "tensor:4"):
        np.testing.assert_allclose(results[setting][0], ref_states, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(results[setting][1], ref_margins, rtol=1e-4, atol=1e-4)
