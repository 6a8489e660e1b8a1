"""Sequence parallelism of the encoder under split weights (`ModelOptions.sequence_parallel`,
`kalm_jax.model.layers.sequence_axis`): where it applies, the same states as whole tokens, the collectives it
compiles to (a reduce-scatter per row-parallel projection, all-gathers of activations only), and the engine
turning it on for its tensor layout without touching the caller's model."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.model import layers
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.model.options import ModelOptions
from kalm_jax.parallel.mesh import make_mesh

SP = ModelOptions(attention_impl="xla", sequence_parallel="tensor")


def _cfg():
    """tiny with 4 query heads over 2 kv heads and 2 layers (one sliding, one full); MLP width 96, so that no
    weight has an activation's shape."""
    return dataclasses.replace(get_preset("tiny"), num_heads=4, num_kv_heads=2, intermediate_size=96)


def _mesh(data: int, tensor: int):
    return make_mesh({"data": data, "fsdp": 1, "tensor": tensor}, jax.devices()[: data * tensor])


def test_sequence_axis_applies_only_where_the_split_divides():
    cfg = _cfg()
    assert layers.sequence_axis(cfg, SP, 8, 64) is None  # no context mesh
    with jax.set_mesh(_mesh(2, 4)):
        assert layers.sequence_axis(cfg, SP, 8, 64) == "tensor"
        assert layers.sequence_axis(cfg, SP.replace(sequence_parallel=None), 8, 64) is None
        assert layers.sequence_axis(cfg, SP, 8, 62) is None  # tokens
        assert layers.sequence_axis(cfg, SP, 3, 64) is None  # rows over data = 2
        assert layers.sequence_axis(dataclasses.replace(cfg, num_heads=2), SP, 8, 64) is None  # heads
        assert layers.sequence_axis(cfg, SP.replace(activations="int8"), 8, 64) is None  # per-token int8 scales
        assert layers.sequence_axis(cfg, SP.replace(sequence_parallel="model"), 8, 64) is None  # no such axis
    with jax.set_mesh(_mesh(8, 1)):
        assert layers.sequence_axis(cfg, SP, 8, 64) is None  # tensor of size 1


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-6), ("bfloat16", 2e-2)])
def test_split_tokens_give_the_whole_token_states(dtype, tol):
    """On 8 CPU devices (data 2 x tensor 4, the engine's tensor layout and weights): the encoder's states with the
    residual stream split over tensor (the engine's program) equal those with whole tokens (the caller's model, on
    the same placed weights), up to the rounding of the reduction order; padded rows too."""
    cfg = _cfg()
    model = build_model(cfg, param_dtype=dtype, options=ModelOptions(attention_impl="xla"))
    engine = InferenceEngine(model, devices=jax.devices(), yes_id=1, no_id=2, weights="tensor:4", share_weights=False)
    assert dict(engine.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (4, 64)).astype(np.int32)
    mask = (np.arange(64)[None] < np.array([64, 40, 17, 64])[:, None]).astype(np.int32)
    ids_d, mask_d = engine._put(ids, mask)
    out = {}
    for sp, graphdef in (("tensor", engine._graphdef), (None, nnx.graphdef(model))):

        @jax.jit
        def encode(state, ids, mask, graphdef=graphdef):
            return nnx.merge(graphdef, state).encode(ids, mask)

        with jax.set_mesh(engine.mesh):
            compiled = encode.lower(engine._state, ids_d, mask_d).compile()
            out[sp] = np.asarray(compiled(engine._state, ids_d, mask_d))
        scatters = len(re.findall(r"\breduce-scatter(-start)?\(", compiled.as_text()))
        assert scatters == (2 * len(cfg.encoder_layer_types) if sp else 0), (sp, scatters)
    ref = out[None].astype(np.float32)
    np.testing.assert_allclose(out["tensor"].astype(np.float32), ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_row_parallel_projection_with_quantized_weights():
    """`project_scatter` with an int8 `qwix.QArray` weight (values split, per-output-channel scales whole): the
    plain quantized projection's result, its tokens split over tensor."""
    from kalm_jax.model import quantization

    mesh = _mesh(2, 4)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 16, 8, 32)), jnp.float32)
    w = quantization.quantize_weight(jnp.asarray(rng.normal(size=(1, 8, 32, 64)), jnp.float32), "o", "int8")
    w = jax.tree.map(lambda a: a[0], w)  # one layer: [N, D, H], scale [1, 1, H]
    want = layers.project("btnd,ndh->bth", x, w)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x, w: layers.project_scatter("btnd,ndh->bth", x, w, None, "tensor"))(x, w)
    assert got.sharding.spec[1] == "tensor"
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_engine_turns_it_on_for_split_weights_only():
    """The engine's tensor layout encodes with split tokens (reduce-scatters, every all-gather an activation's)
    and leaves the caller's model as it was; the replicated layout has no collective to split."""
    model = build_model(_cfg(), param_dtype="float32")
    weight_shapes = {tuple(v.shape[1:]) for v in jax.tree.leaves(nnx.split(model)[1])} | {
        tuple(v.shape) for v in jax.tree.leaves(nnx.split(model)[1])
    }
    tensor = InferenceEngine(model, devices=jax.devices(), yes_id=1, no_id=2, weights="tensor:4", share_weights=False)
    replicated = InferenceEngine(model, devices=jax.devices(), yes_id=1, no_id=2, weights="replicated")
    assert model.options.sequence_parallel is None
    assert tensor.policy.sequence_axis == "tensor" and replicated.policy.sequence_axis is None
    hlo = tensor.encode_program(8, 64, 4).lower().compile().as_text()
    assert len(re.findall(r"\breduce-scatter(-start)?\(", hlo)) == 4
    gathered = re.findall(r"= \(?(\w+)\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", hlo)
    assert gathered
    for _, dims in gathered:
        shape = tuple(int(d) for d in dims.split(",") if d)
        assert shape not in weight_shapes, shape
    assert "reduce-scatter" not in replicated.encode_program(8, 64, 4).lower().compile().as_text()
