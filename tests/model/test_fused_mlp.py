"""The fused MLP Pallas kernel (kalm_jax/model/fused_mlp.py), run in Pallas interpret mode on CPU, against the
reference sub-block `x + layers.mlp_block(x, ...)`: forward, gradients, under a data mesh, with its channels split
over a tensor mesh, inside the whole model; and where the model uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kalm_jax.model import fused_mlp, layers, quantization
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.model.options import ModelOptions

TINY = get_preset("tiny")
EPS = 1e-6


def _weights(hidden: int, width: int, dtype=jnp.float32, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 5)
    return (
        (0.3 * jax.random.normal(k[0], (hidden,))).astype(dtype),
        (jax.random.normal(k[1], (hidden, width)) / hidden**0.5).astype(dtype),
        (jax.random.normal(k[2], (hidden, width)) / hidden**0.5).astype(dtype),
        (jax.random.normal(k[3], (width, hidden)) / width**0.5).astype(dtype),
        (0.3 * jax.random.normal(k[4], (hidden,))).astype(dtype),
    )


def reference(x, pre, gate, up, down, post):
    """x + post_norm(down(gelu_tanh(h @ gate) * (h @ up))), h = pre_norm(x): the model's own functions."""
    h = layers.rms_norm(x, pre, EPS)
    return x + layers.rms_norm(layers.mlp(h, gate, up, down), post, EPS)


def fused(*args):
    return fused_mlp.fused_mlp_residual(*args, EPS, reference, interpret=True)


@pytest.mark.parametrize("shape", [(3, 37), (2, 300)], ids=["rows-padded-to-8", "two-blocks-of-512"])
def test_kernel_is_the_reference_sub_block(shape):
    """fp32: the kernel (norms, three matmuls, gelu, residual in one pass) equals the reference to 1e-5, on a row
    count that is not a multiple of 8 (111 rows) and on one that spans two blocks of 512 (600 rows, padded)."""
    x = jax.random.normal(jax.random.key(1), (*shape, 128)) * 2.0
    w = _weights(128, 256)
    got, want = np.asarray(jax.jit(fused)(x, *w)), np.asarray(reference(x, *w))
    assert got.shape == want.shape == (*shape, 128)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(got - np.asarray(x)).max() > 0.1  # the update is not negligible


def test_kernel_in_bf16_is_as_close_to_fp32_as_the_reference():
    """bf16 operands: the kernel keeps gate and up in fp32 between the matmuls, so it is no further from the fp32
    result than the bf16 reference is."""
    x = jax.random.normal(jax.random.key(2), (4, 64, 128))
    w = _weights(128, 256)
    exact = np.asarray(reference(x, *w))
    bf = [a.astype(jnp.bfloat16) for a in (x, *w)]
    err_kernel = np.abs(np.asarray(jax.jit(fused)(*bf), np.float32) - exact).max()
    err_reference = np.abs(np.asarray(jax.jit(reference)(*bf), np.float32) - exact).max()
    assert err_kernel <= err_reference * 1.01 + 1e-6
    assert err_kernel < 0.1


def test_gradients_are_the_references():
    """The backward pass differentiates the reference: every input's gradient equals the reference's."""
    x = jax.random.normal(jax.random.key(3), (2, 24, 128))
    w = _weights(128, 256)
    cot = jax.random.normal(jax.random.key(4), x.shape)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * cot)

    got = jax.grad(loss(fused), argnums=tuple(range(6)))(x, *w)
    want = jax.grad(loss(reference), argnums=tuple(range(6)))(x, *w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)


def test_kernel_runs_per_shard_under_a_data_mesh():
    """Under a mesh context the kernel runs in a `shard_map` over the batch axes (Mosaic kernels are not
    partitioned by XLA): the batch stays split, every shard's rows are its own, the result is the reference's."""
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    x = jax.random.normal(jax.random.key(5), (8, 16, 128))
    w = _weights(128, 256)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        got = jax.jit(fused)(xs, *w)
        assert got.sharding.spec == P(("data", "fsdp"))
        text = jax.jit(fused).lower(xs, *w).as_text()
    assert "all-gather" not in text and "all_gather" not in text
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference(x, *w)), atol=1e-5, rtol=1e-5)


def _margins(model, ids, mask, dec, dmask):
    graphdef, state = nnx.split(model)

    def fn(s, ids, mask, dec, dmask):
        m = nnx.merge(graphdef, s)
        states = m.encode(ids, mask)
        return states, m.score_margin(dec, dmask, states, mask, 7, 9)

    return jax.jit(fn)(state, ids, mask, dec, dmask)


def test_the_model_runs_the_kernel_in_every_mlp_and_scores_as_the_reference():
    """`tpu_mlp="fused"` with `pallas_interpret`: every encoder and decoder layer's MLP (the decoder's last layer
    for the scored row alone) is the kernel, and the encoder states and margins are the reference model's."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 8000, (3, 20)).astype(np.int32)
    mask = (np.arange(20)[None] < np.array([[20], [13], [7]])).astype(np.int32)
    dec = rng.integers(3, 8000, (3, 9)).astype(np.int32)
    dmask = (np.arange(9)[None] < np.array([[9], [4], [6]])).astype(np.int32)
    ref = build_model(TINY, seed=4, options=ModelOptions(attention_impl="xla", tpu_mlp="xla"))
    kern = build_model(TINY, seed=4, options=ModelOptions(attention_impl="xla", pallas_interpret=True))
    jaxpr = str(jax.make_jaxpr(lambda i, m: kern.encode(i, m))(ids, mask))
    assert jaxpr.count("pallas_call[") == len(TINY.encoder_layer_types) and "kalm_fused_mlp" in jaxpr
    assert "kalm_fused_mlp" not in str(jax.make_jaxpr(lambda i, m: ref.encode(i, m))(ids, mask))
    (s_ref, m_ref), (s_kern, m_kern) = _margins(ref, ids, mask, dec, dmask), _margins(kern, ids, mask, dec, dmask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(s_kern)[real], np.asarray(s_ref)[real], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m_kern), np.asarray(m_ref), atol=2e-5, rtol=1e-5)
    # the default options pick the kernel by platform: the TPU branch holds it, CPU runs the reference
    auto = build_model(TINY, seed=4)
    assert "kalm_fused_mlp" in str(jax.make_jaxpr(lambda i, m: auto.encode(i, m))(ids, mask))
    np.testing.assert_allclose(np.asarray(_margins(auto, ids, mask, dec, dmask)[1]), np.asarray(m_ref), atol=2e-5)


@pytest.mark.parametrize("sequence", [True, False], ids=["tokens-split", "tokens-whole"])
def test_split_kernel_is_the_reference_under_a_tensor_mesh(sequence):
    """`fused_mlp_residual(axis="tensor")` under a (data, tensor) mesh with gate / up split by columns and down by
    rows: each device runs the kernel on its channels and the partial products are reduce-scattered back to its
    tokens (tokens split over `tensor`: all-gathered first) or all-reduced (tokens whole); no weight is
    gathered, the result is the whole sub-block's."""
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    x = jax.random.normal(jax.random.key(5), (4, 16, 128)) * 2.0
    w = _weights(128, 512)
    tokens = P("data", "tensor") if sequence else P("data")

    def f(*args):
        return fused_mlp.fused_mlp_residual(*args, EPS, reference, axis="tensor", sequence=sequence, interpret=True)

    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, tokens))
        specs = (P(), P(None, "tensor"), P(None, "tensor"), P("tensor", None), P())
        ws = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(w, specs)]
        got = jax.jit(f)(xs, *ws)
        text = jax.jit(f).lower(xs, *ws).as_text()
    assert got.sharding.spec == tokens
    gathers = [line for line in text.splitlines() if "stablehlo.all_gather" in line]
    assert len(gathers) == (1 if sequence else 0) and all("tensor<2x16x128xf32>" in g for g in gathers)  # x only
    assert ("stablehlo.reduce_scatter" in text) == sequence and ("stablehlo.all_reduce" in text) != sequence
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference(x, *w)), atol=1e-5, rtol=1e-5)


def test_vmem_capacity_is_pallas_table_for_the_device_kind():
    """The VMEM of a TensorCore from `jax.Device.device_kind` (Pallas's own table) and the kernel's budget in it."""
    mib = 2**20
    kinds = {"TPU v4": 16, "TPU v5 lite": 128, "TPU v5e": 128, "TPU v5": 64, "TPU v5p": 64, "TPU v6 lite": 128}
    assert {k: fused_mlp.vmem_capacity(k) for k in kinds} == {k: v * mib for k, v in kinds.items()}
    assert fused_mlp.vmem_capacity("cpu") is None and fused_mlp.vmem_capacity("NVIDIA H200") is None
    assert fused_mlp.vmem_budget(None) == fused_mlp.vmem_budget(16 * mib) == fused_mlp.VMEM_BYTES == 16 * mib
    assert fused_mlp.vmem_budget(128 * mib) == 96 * mib
    with pytest.raises(ValueError, match="tpu_vmem_bytes=0: a positive int"):
        ModelOptions(tpu_vmem_bytes=0)


def test_the_kernel_applies_only_where_its_weights_are_float_and_fit():
    """`layers.fuses_mlp`: float weights of the activations' dtype, float activations, and one device's channels
    within the VMEM budget of the program's generation (`tpu_vmem_bytes`); tokens split only over the `tensor`
    axis the channels are split over. Nano fits any generation; small fits v5e's VMEM, not the scoped default;
    large fits v5e at tensor 2 (75 MiB of bf16 weights per device), not whole and not on v4."""
    opts = ModelOptions()
    v5e = opts.replace(tpu_vmem_bytes=fused_mlp.vmem_capacity("TPU v5 lite"))
    v4 = opts.replace(tpu_vmem_bytes=fused_mlp.vmem_capacity("TPU v4"))

    def w(cfg_or_hidden, width=None, dtype=jnp.bfloat16):
        hidden = cfg_or_hidden if width else cfg_or_hidden.hidden_size
        width = width or cfg_or_hidden.intermediate_size
        shapes = (("gate", (hidden, width)), ("up", (hidden, width)), ("down", (width, hidden)))
        return {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes}

    nano, small, large = get_preset("nano"), get_preset("small"), get_preset("large")
    assert layers.fuses_mlp(w(nano), jnp.bfloat16, opts, None) and layers.fuses_mlp(w(nano), jnp.bfloat16, v4, None)
    assert not layers.fuses_mlp(w(small), jnp.bfloat16, opts, None)
    assert layers.fuses_mlp(w(small), jnp.bfloat16, v5e, None)
    assert not layers.fuses_mlp(w(large), jnp.bfloat16, v5e, None)
    assert not layers.fuses_mlp(w(640, 2048), jnp.float32, opts, None)  # weights bf16, activations fp32
    assert not layers.fuses_mlp(w(640, 2048), jnp.bfloat16, opts, "tensor")  # tokens split, channels whole
    assert not layers.fuses_mlp(w(640, 2048), jnp.bfloat16, opts.replace(activations="int8"), None)
    tensor = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    with jax.set_mesh(tensor):
        assert layers.fuses_mlp(w(640, 2048), jnp.bfloat16, opts, None)
        assert layers.fuses_mlp(w(640, 2048), jnp.bfloat16, opts, "tensor")
        assert not layers.fuses_mlp(w(640, 2048), jnp.bfloat16, opts, "data")
        assert not layers.fuses_mlp(w(640, 2047), jnp.bfloat16, opts, None)  # channels not divisible
        assert layers.fuses_mlp(w(large), jnp.bfloat16, v5e, "tensor")
        assert not layers.fuses_mlp(w(large), jnp.bfloat16, v4, "tensor")
        assert not layers.fuses_mlp(w(large), jnp.bfloat16, opts, "tensor")
    with jax.set_mesh(Mesh(np.array(jax.devices()[:4]), ("data",))):
        assert layers.fuses_mlp(w(640, 2048), jnp.bfloat16, opts, None)
    q = quantization.quantize_weight(jnp.ones((640, 2048), jnp.bfloat16), "gate", "int8")
    quantized = {"gate": q, "up": q, "down": q}
    assert not layers.fuses_mlp(quantized, jnp.bfloat16, opts, None)
    with pytest.raises(ValueError, match=r"tpu_mlp='pallas'; valid: \['fused', 'xla'\]"):
        ModelOptions(tpu_mlp="pallas")
