"""Weight quantization (int8, int8-dynamic, fp8) against independent references: numpy absmax quantization of
each weight, the float model run on the dequantized weights, the lowered program's matmul operand types."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import qwix
from flax import nnx

from kalm_jax.inference import programs
from kalm_jax.model import quantization
from kalm_jax.model.build import LoRASpec, build_model
from kalm_jax.model.config import get_preset
from kalm_jax.model.t5gemma2 import STACK_PARAMS, param_tree

MODES = ("int8", "int8-dynamic", "fp8")


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=3)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8000, (4, 48)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 30:] = 0
    mask[3, 9:] = 0
    dec = rng.integers(0, 8000, (4, 14)).astype(np.int32)
    dmask = np.ones_like(dec)
    dmask[2, 10:] = 0
    return ids, mask, dec, dmask


@nnx.jit
def _margins(m, ids, mask, dec, dmask):
    return m.score_margin(dec, dmask, m.encode(ids, mask), mask, 5, 6)


def margins(m, batch):
    """Margins [B] of `m` on `batch`, one compiled program per model structure (eager runs take minutes)."""
    return np.asarray(_margins(m, *batch))


def numpy_absmax_int8(w: np.ndarray, contracted: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with Qwix's bound: the 127 bucket spans [126.5, 127.5), so scale = absmax / 127.5."""
    scale = np.abs(w).max(axis=contracted, keepdims=True) / 127.5
    return np.clip(np.round(w / scale), -128, 127).astype(np.int8), scale


def test_int8_weights_are_per_channel_absmax(model):
    q = quantization.quantize_model(model, "int8")
    for stack in ("encoder", "decoder"):
        for name in quantization.QUANTIZED:
            w = np.asarray(getattr(getattr(model, stack), name).get_value(), np.float32)
            got = getattr(getattr(q, stack), name).get_value()
            contracted = tuple(range(1, 1 + STACK_PARAMS[name][1]))
            want_q, want_scale = numpy_absmax_int8(w, contracted)
            assert got.qvalue.dtype == jnp.int8 and got.scale.dtype == jnp.float32
            assert got.scale.shape == want_scale.shape, (stack, name)
            np.testing.assert_allclose(np.asarray(got.scale), want_scale, rtol=1e-6)
            # Qwix multiplies by 1/scale: values within float rounding of a half step may land one step apart
            diff = np.abs(np.asarray(got.qvalue, np.int32) - want_q.astype(np.int32))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.02, (stack, name)
            # the defining property: every value is within half a step (plus float rounding) of the weight
            err = np.abs(np.asarray(got.qvalue, np.float32) * want_scale - w)
            assert (err <= 0.5 * want_scale * (1 + 1e-3)).all(), (stack, name)


def test_the_head_embedding_and_norms_stay_float(model):
    for mode in MODES:
        q = quantization.quantize_model(model, mode)
        assert quantization.mode_of(q) == mode and q.is_quantized
        for path, leaf in jax.tree_util.tree_flatten_with_path(param_tree(q))[0]:
            keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
            quantized = keys[0] in ("encoder", "decoder") and keys[1] in quantization.QUANTIZED
            if not quantized:
                assert leaf.dtype == jnp.float32, keys
        assert q.embedding.get_value() is model.embedding.get_value()  # the tied head rows, untouched
        for stack in ("encoder", "decoder"):
            for name in STACK_PARAMS:
                v = getattr(getattr(q, stack), name).get_value()
                assert isinstance(v, qwix.QArray) == (name in quantization.QUANTIZED), (stack, name)
    # the model given is never changed
    assert quantization.mode_of(model) == "none"
    assert not isinstance(model.decoder.q.get_value(), qwix.QArray)


def test_quantized_run_equals_the_float_model_on_dequantized_weights(model, batch):
    """Weight-only modes compute exactly what the float model computes with value x scale as its weights."""
    for mode in ("int8", "fp8"):
        q = quantization.quantize_model(model, mode)
        reference = quantization.dequantize_model(q, jnp.float32)
        assert quantization.mode_of(reference) == "none"
        np.testing.assert_allclose(margins(q, batch), margins(reference, batch), rtol=1e-5, atol=1e-5)


def test_quantized_margins_stay_close_to_float(model, batch):
    ref = margins(model, batch)
    spread = ref.max() - ref.min()
    for mode, bound in (("int8", 0.02), ("int8-dynamic", 0.05), ("fp8", 0.08)):
        got = margins(quantization.quantize_model(model, mode), batch)
        err = np.abs(got - ref).max() / spread
        assert 0 < err < bound, (mode, err)


def _dot_operand_types(q, batch) -> list[tuple[str, str]]:
    ids, mask, _, _ = batch
    graphdef, state = nnx.split(q)
    text = programs.encode_pool.lower(graphdef, state, ids, mask, 1).as_text()
    return re.findall(r"stablehlo\.dot_general[^\n]*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", text)


def test_int8_dynamic_runs_int8_matmuls_and_keeps_attention_float(model, batch):
    weight_only = _dot_operand_types(quantization.quantize_model(model, "int8"), batch)
    dynamic = _dot_operand_types(quantization.quantize_model(model, "int8-dynamic"), batch)
    assert weight_only and len(weight_only) == len(dynamic)
    assert not any("i8" in pair for pair in weight_only)
    int8 = [p for p in dynamic if p == ("i8", "i8")]
    # 2 encoder layers x (q, k, v, o, gate, up, down)
    assert len(int8) == 2 * len(quantization.QUANTIZED)
    assert all(p[0] in ("f32", "bf16") and p[1] in ("f32", "bf16") for p in dynamic if p != ("i8", "i8"))


def test_modes_convert_and_refuse_as_documented(model):
    q = quantization.quantize_model(model, "int8")
    assert quantization.quantize_model(q, "int8") is q
    dyn = quantization.quantize_model(q, "int8-dynamic")
    assert quantization.mode_of(dyn) == "int8-dynamic" and quantization.mode_of(q) == "int8"
    assert dyn.decoder.q.get_value().qvalue is q.decoder.q.get_value().qvalue  # same weights, other activations
    with pytest.raises(ValueError, match="already quantized"):
        quantization.quantize_model(q, "fp8")
    with pytest.raises(ValueError, match="dequantize_model"):
        quantization.quantize_model(q, "none")
    with pytest.raises(ValueError, match="expected one of none, int8, int8-dynamic, fp8"):
        quantization.quantize_model(model, "int4")
    with pytest.raises(ValueError, match="LoRA on quantized weights"):
        q.add_lora(4, 8.0)


def test_lora_is_merged_before_quantizing():
    cfg = get_preset("tiny")
    lora = build_model(cfg, lora=LoRASpec(rank=4, alpha=8.0), seed=1)
    for stack in ("encoder", "decoder"):  # non-zero adapters, so that merging matters
        for name in lora.encoder.lora_targets:
            b = getattr(getattr(lora, stack), f"{name}_lora_b")
            b.set_value(jnp.full(b.get_value().shape, 0.05, b.get_value().dtype))
    merged = nnx.clone(lora)
    merged.merge_lora()
    q = quantization.quantize_model(lora, "int8")
    assert not q.has_lora and lora.has_lora
    want = quantization.quantize_weight(merged.decoder.q.get_value(), "q", "int8")
    np.testing.assert_array_equal(np.asarray(q.decoder.q.get_value().qvalue), np.asarray(want.qvalue))


def test_abstract_quantized_model_has_the_concrete_shapes_and_dtypes(model):
    cfg = get_preset("tiny")
    abstract = quantization.abstract_quantized(build_model(cfg, abstract=True), "int8")
    concrete = quantization.quantize_model(model, "int8")
    a = jax.tree.leaves(param_tree(abstract))
    c = jax.tree.leaves(param_tree(concrete))
    assert [(x.shape, x.dtype) for x in a] == [(x.shape, x.dtype) for x in c]
    sizes = quantization.weight_bytes(concrete)
    float_sizes = quantization.weight_bytes(model)
    assert sizes["float"] + sizes["quantized"] == sizes["total"] and float_sizes["quantized"] == 0
    # int8 values are a quarter of fp32 weights; scales add one fp32 per output channel and layer
    w = sum(
        np.prod(getattr(getattr(model, s), n).get_value().shape)
        for s in ("encoder", "decoder")
        for n in quantization.QUANTIZED
    )
    assert w <= sizes["quantized"] < w * 1.1


def test_fp8_values_are_float8_e4m3(model):
    q = quantization.quantize_model(model, "fp8")
    v = q.encoder.gate.get_value()
    assert v.qvalue.dtype == ml_dtypes.float8_e4m3fn
    w = np.asarray(model.encoder.gate.get_value(), np.float32)
    np.testing.assert_allclose(np.asarray(qwix.dequantize(v)), w, rtol=0.07, atol=1e-6)


def test_an_abstract_model_quantizes_abstractly():
    abstract = build_model(get_preset("tiny"), abstract=True, param_dtype="bfloat16")
    q = quantization.quantize_model(abstract, "int8-dynamic")
    v = q.decoder.q.get_value()
    assert isinstance(v.qvalue, jax.ShapeDtypeStruct) and v.qvalue.dtype == jnp.int8
    assert quantization.mode_of(q) == "int8-dynamic" and quantization.mode_of(abstract) == "none"
