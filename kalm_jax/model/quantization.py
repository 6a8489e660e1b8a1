"""Post-training weight quantization with Qwix: int8 or fp8 projection and MLP weights, the head kept exact.

    model = quantize_model(model, "int8")          # a new model; `model` itself is left as it was
    mode_of(model)                                 # "int8"
    model = dequantize_model(model)                # float weights again (e.g. for an export)

Modes (`MODES`):
  * ``none``: the weights as loaded (bf16 for serving checkpoints).
  * ``int8``: weight-only; each projection (q, k, v, o) and MLP (gate, up, down) weight of both stacks is
    stored as int8 with one absmax scale per output channel and layer (`qwix.quantize`, channel-wise over every
    axis that is not contracted; scale = max|w| / 127.5, Qwix's symmetric int8 bound). The matmuls dequantize
    it on the fly (`kalm_jax.model.layers.project`).
  * ``int8-dynamic``: the same int8 weights, and the inputs of those matmuls quantized per token to int8 at run
    time (`ModelOptions.activations = "int8"`): int8 x int8 matmuls with int32 accumulation.
  * ``fp8``: weight-only, float8_e4m3fn values with the same per-channel scales (halves the weights' memory;
    the matmul runs in the compute dtype after dequantization on any backend).

What stays exact whatever the mode: the embedding table (so the tied yes/no rows of the head), the eoi
embedding and every norm keep the dtype the model was loaded in; the head's dot products run in fp32
(`T5Gemma2.score_margin`); attention's score and value einsums (activation x activation) are never quantized.
Quantization is deterministic (absmax, no calibration data) and starts from any float model the one loader
returns; LoRA adapters are merged first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from kalm_jax.model.t5gemma2 import STACK_PARAMS, STACKS, T5Gemma2

MODES = ("none", "int8", "int8-dynamic", "fp8")
QUANTIZED = ("q", "k", "v", "o", "gate", "up", "down")
"""The stack parameters quantized (every weight of a matmul; the norms stay float)."""

_QTYPES = {"int8": jnp.int8, "int8-dynamic": jnp.int8, "fp8": jnp.float8_e4m3fn}


def check_mode(mode: str) -> str:
    """`mode` itself when it is one of `MODES`, else a ValueError naming them."""
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def channel_axes(name: str, ndim: int) -> tuple[int, ...]:
    """Axes of a stacked weight [L, *in, *out] that get their own scale: the layer axis and every output axis
    (the contracted input axes share one scale per channel). E.g. q [L, H, N, D] -> (0, 2, 3), o [L, N, D, H]
    -> (0, 3)."""
    n_in = STACK_PARAMS[name][1]
    return (0, *range(1 + n_in, ndim))


def quantize_weight(w: jax.Array, name: str, mode: str) -> qwix.QArray:
    """One stacked weight `name` [L, ...] as a `qwix.QArray` of `mode`: int8 / float8 values of w's shape and fp32
    absmax scales of shape [L, 1.., *out] (size 1 on the contracted axes)."""
    return qwix.quantize(
        jnp.asarray(w, jnp.float32),
        _QTYPES[check_mode(mode)],
        channelwise_axes=channel_axes(name, w.ndim),
        calibration_method="absmax",
        scale_dtype=jnp.float32,
    )


def mode_of(model: T5Gemma2) -> str:
    """The `MODES` entry a model runs in ("none" for float weights)."""
    value = model.decoder.q.get_value()
    if not isinstance(value, qwix.QArray):
        return "none"
    if jnp.dtype(value.qtype) == jnp.dtype(jnp.float8_e4m3fn):
        return "fp8"
    return "int8-dynamic" if model.options.activations == "int8" else "int8"


def quantize_model(model: T5Gemma2, mode: str) -> T5Gemma2:
    """A copy of `model` in `mode` (see the module docstring); `model` is not changed. Mode "none" returns `model`
    when its weights are float and raises for a quantized one (`dequantize_model` goes back). A model already in
    `mode` is returned as it is; another quantized mode is refused (quantize the float model instead). An abstract
    model (`jax.ShapeDtypeStruct` leaves) gives the abstract quantized model (`abstract_quantized`)."""
    check_mode(mode)
    current = mode_of(model)
    if current == mode:
        return model
    if current == "none" and isinstance(model.decoder.q.get_value(), jax.ShapeDtypeStruct):
        return abstract_quantized(model, mode)
    if current != "none":
        if {current, mode} == {"int8", "int8-dynamic"}:  # same weights, other activations
            out = nnx.clone(model)
            out.options = model.options.replace(activations="int8" if mode == "int8-dynamic" else "float")
            return out
        raise ValueError(
            f"the model's weights are already quantized ({current}); quantize the float model to {mode!r}"
            + (" (dequantize_model gives float weights back)" if mode == "none" else "")
        )
    out = nnx.clone(model)  # new variables over the same arrays: `model` keeps its own
    if out.has_lora:
        out.merge_lora()
    for stack in STACKS:
        layer_stack = getattr(out, stack)
        for name in QUANTIZED:
            var = getattr(layer_stack, name)
            var.set_value(quantize_weight(var.get_value(), name, mode))
    out.options = out.options.replace(activations="int8" if mode == "int8-dynamic" else "float")
    return out


def dequantize_model(model: T5Gemma2, dtype=None) -> T5Gemma2:
    """A copy of `model` with float weights (value x scale, in `dtype`; default: the embedding's dtype, i.e. the
    dtype the model was loaded in) and float activations; a float model is returned as it is."""
    if mode_of(model) == "none":
        return model
    dtype = jnp.dtype(dtype or model.embedding.get_value().dtype)
    out = nnx.clone(model)
    for stack in STACKS:
        for name in QUANTIZED:
            var = getattr(getattr(out, stack), name)
            var.set_value(qwix.dequantize(var.get_value()).astype(dtype))
    out.options = out.options.replace(activations="float")
    return out


def abstract_quantized(model: T5Gemma2, mode: str) -> T5Gemma2:
    """`quantize_model` of an abstract model (`build_model(..., abstract=True)`): `jax.ShapeDtypeStruct` leaves
    (the restore target of a quantized checkpoint; ahead-of-time programs)."""
    if mode == "none":
        return model
    return nnx.eval_shape(lambda m: quantize_model(m, mode), model)


def weight_bytes(model: T5Gemma2) -> dict[str, int]:
    """Bytes of the model's weights: {"quantized": values + scales of the quantized weights, "float": the
    rest, "total"} (arrays or `jax.ShapeDtypeStruct`s)."""
    quantized = floating = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        n = int(np.prod(leaf.shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if any(k in ("qvalue", "scale") for k in keys):
            quantized += n
        else:
            floating += n
    return {"quantized": quantized, "float": floating, "total": quantized + floating}


__all__ = [
    "MODES",
    "QUANTIZED",
    "abstract_quantized",
    "channel_axes",
    "check_mode",
    "dequantize_model",
    "mode_of",
    "quantize_model",
    "quantize_weight",
    "weight_bytes",
]
