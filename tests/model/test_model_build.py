"""The one model builder (`kalm_jax.model.build`), the model's options (`kalm_jax.model.options`) and the one
yes/no head (`kalm_jax.model.head`): layouts, seeds and dtypes of what is built; options that belong to one
model and reach the programs and the attention kernel; the head against the full-vocabulary logits."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kalm_jax.model import head
from kalm_jax.model.attention import dispatch
from kalm_jax.model.build import LoRASpec, build_model
from kalm_jax.model.config import get_preset
from kalm_jax.model.options import ModelOptions, analysis_options
from kalm_jax.model.t5gemma2 import T5Gemma2, param_tree

TINY = get_preset("tiny")
# Four layers per stack (two whole periods of sliding + full): the layer scan has a loop to unroll.
DEEP = dataclasses.replace(
    TINY, encoder_layer_types=TINY.encoder_layer_types * 2, decoder_layer_types=TINY.decoder_layer_types * 2
)


def _tokens(seed: int, b: int, t: int, real: list[int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 8000, (b, t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.asarray(real)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


def _jit(model, fn, *args):
    """fn(model, *args) as one compiled program (eager calls compile every operation on its own)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)


def _margins(model, ids, mask, dec, dmask):
    def fn(m, ids, mask, dec, dmask):
        return m.score_margin(dec, dmask, m.encode(ids, mask), mask, 7, 9)

    return _jit(model, fn, ids, mask, dec, dmask)


def _numpy(model) -> dict:
    return jax.tree.map(np.asarray, param_tree(model))


def test_abstract_and_concrete_models_have_one_layout():
    spec = LoRASpec(rank=4, alpha=8.0, targets=("q", "v"), stacks=("decoder",))
    concrete = build_model(TINY, lora=spec, param_dtype="bfloat16", seed=5)
    abstract = build_model(TINY, lora=spec, param_dtype="bfloat16", abstract=True)

    def layout(m):
        return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), param_tree(m))

    assert layout(concrete) == layout(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(param_tree(abstract)))
    tree = layout(concrete)
    n_layers, h, r = len(TINY.decoder_layer_types), TINY.hidden_size, 4
    lora = {k: v for k, v in tree["decoder"].items() if "lora" in k}
    assert lora == {
        "q_lora_a": ((n_layers, h, r), "float32"),  # factors drawn and kept in fp32 (LoRASpec.dtype)
        "q_lora_b": ((n_layers, r, TINY.num_heads, TINY.head_dim), "float32"),
        "v_lora_a": ((n_layers, h, r), "float32"),
        "v_lora_b": ((n_layers, r, TINY.num_kv_heads, TINY.head_dim), "float32"),
    }
    assert not any("lora" in k for k in tree["encoder"])
    assert tree["embedding"] == ((TINY.vocab_size, h), "bfloat16")
    assert concrete.dtype == jnp.bfloat16 and concrete.decoder.lora_scale == 2.0
    bf16_factors = build_model(TINY, lora=dataclasses.replace(spec, dtype="bfloat16"), abstract=True)
    assert layout(bf16_factors)["decoder"]["q_lora_a"] == ((n_layers, h, r), "bfloat16")


def test_seeds_weights_and_lora_draws():
    """The weights come from nnx.Rngs(seed) and the LoRA factors from nnx.Rngs(seed + 1) (the initialisation
    training runs were started with: resumed and repeated runs depend on it); adding LoRA leaves the weights
    and, B being zero, the margins as they are."""
    plain = build_model(TINY, seed=3)
    want = T5Gemma2(TINY, rngs=nnx.Rngs(3))
    want.add_lora(8, 16.0, ("q", "k", "v", "o"), rngs=nnx.Rngs(4))
    with_lora = build_model(TINY, seed=3, lora=LoRASpec(rank=8, alpha=16.0))
    jax.tree.map(np.testing.assert_array_equal, _numpy(with_lora), _numpy(want))
    base = {k: v for k, v in _numpy(with_lora).items() if k not in ("encoder", "decoder")}
    jax.tree.map(np.testing.assert_array_equal, base, {k: v for k, v in _numpy(plain).items() if k in base})
    assert not np.array_equal(_numpy(build_model(TINY, seed=4))["embedding"], _numpy(plain)["embedding"])
    ids, mask = _tokens(0, 2, 20, [20, 13])
    dec, dmask = _tokens(1, 2, 9, [9, 6])
    np.testing.assert_array_equal(_margins(plain, ids, mask, dec, dmask), _margins(with_lora, ids, mask, dec, dmask))


def test_build_on_a_loaded_model_wires_lora_dtypes_and_options():
    loaded = build_model(TINY, seed=2)
    before = _numpy(loaded)
    options = ModelOptions(remat=True, remat_policy="qkv")
    spec = LoRASpec(rank=4, alpha=4.0, dtype="bfloat16")
    model = build_model(TINY, base=loaded, lora=spec, seed=7, param_dtype="bfloat16", dtype="float32", options=options)
    after = _numpy(model)
    for path, leaf in jax.tree_util.tree_flatten_with_path(after)[0]:
        key = jax.tree_util.keystr(path)
        assert leaf.dtype == jnp.bfloat16, key
        if "lora" not in key:
            want = before
            for p in path:
                want = want[p.key]
            np.testing.assert_array_equal(leaf, want.astype(jnp.bfloat16), err_msg=key)
    assert not after["encoder"]["q_lora_b"].any() and after["encoder"]["q_lora_a"].any()
    assert model.dtype == jnp.float32 and model.options == options and model.remat_policy == "qkv"
    # a model that has adapters keeps them (only cast); without `lora` everything goes to param_dtype
    again = build_model(TINY, base=model, lora=LoRASpec(rank=16), param_dtype="float32")
    assert again.encoder.q_lora_a.get_value().shape[-1] == 4
    assert again.encoder.q_lora_a.get_value().dtype == jnp.float32 and again.options == options
    with pytest.raises(ValueError, match="abstract"):
        build_model(TINY, base=again, abstract=True)


def _encode_program(model, ids, mask) -> str:
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, i, m: nnx.merge(graphdef, s).encode(i, m)).lower(state, ids, mask).as_text()


@functools.partial(jax.jit, static_argnums=0)
def _shared_encode(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).encode(ids, mask)


def test_options_belong_to_the_model_and_reach_its_programs():
    """Two models of the same weights, one with the cost-analysis options: each program follows its own
    model's options (scan loop vs unrolled), also after the other was built, and both encode alike; one
    jitted function with the graph definition static (as the engine's programs take it) traces each apart
    (`scan_unroll=True` is not the loop of `scan_unroll=1`, although True == 1)."""
    ids, mask = _tokens(2, 2, 24, [24, 15])
    looped = build_model(DEEP, seed=1)
    unrolled = build_model(DEEP, seed=1, options=analysis_options())
    assert unrolled.options == ModelOptions(scan_unroll=True) != ModelOptions(scan_unroll=1)
    assert analysis_options(einsum_attention=True) == ModelOptions(attention_impl="xla", scan_unroll=True)
    assert looped.options == ModelOptions()
    shared = [_shared_encode.lower(*nnx.split(m), ids, mask).as_text() for m in (looped, unrolled)]
    assert "stablehlo.while" in shared[0] and "stablehlo.while" not in shared[1]
    assert "stablehlo.while" in _encode_program(looped, ids, mask)
    assert "stablehlo.while" not in _encode_program(unrolled, ids, mask)
    assert "stablehlo.while" in _encode_program(build_model(DEEP, seed=1), ids, mask)
    encoded = [_jit(m, lambda m, i, k: m.encode(i, k), ids, mask) for m in (unrolled, looped)]
    np.testing.assert_allclose(*encoded, atol=1e-5, rtol=0)
    looped.scan_unroll = True  # assigning a field replaces the model's options
    assert looped.options == ModelOptions(scan_unroll=True)
    assert "stablehlo.while" not in _encode_program(looped, ids, mask)


def test_train_step_builds_its_model_with_the_options_and_the_configs_remat():
    """`make_train_step(options=)`: the step's model carries the given options with `model.remat` /
    `model.remat_policy` of the training config; the analysis options unroll the layer loop of the whole
    step (forward and backward)."""
    from kalm_jax.parallel import mesh as sharding
    from kalm_jax.training.config import default_config
    from kalm_jax.training.step import make_train_step

    cfg = default_config()
    cfg.data.batch_size, cfg.data.group_size, cfg.data.max_document_tokens, cfg.data.decoder_length = 2, 2, 16, 8
    cfg.mep.ratios = (1,)
    cfg.model.remat, cfg.model.remat_policy = True, "qkv"
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    for options, loops in ((None, True), (analysis_options(), False)):
        ts = make_train_step(DEEP, cfg, mesh, yes_id=7, no_id=9, options=options)
        assert ts.model(ts.abstract_state).options == (options or ModelOptions()).replace(
            remat=True, remat_policy="qkv", tpu_mlp="xla"
        )
        assert ("stablehlo.while" in ts.lower().as_text()) == loops


def test_splash_options_reach_the_kernel():
    """`attention_impl="tpu_flash"` with `pallas_interpret` runs the Pallas kernel (interpreted on CPU) in every
    layer of the model and gives the einsum model's encoder states; `tpu_attention="xla"` keeps the einsum
    attention in programs lowered for TPU."""
    ids, mask = _tokens(3, 2, 20, [20, 13])
    # the MLP stays the reference (`tpu_mlp="xla"`): every Pallas call counted here is attention's
    ref = build_model(TINY, seed=4, options=ModelOptions(attention_impl="xla", tpu_mlp="xla"))
    flash = build_model(
        TINY, seed=4, options=ModelOptions(attention_impl="tpu_flash", tpu_mlp="xla", pallas_interpret=True)
    )
    jaxpr = str(jax.make_jaxpr(flash.encode)(ids, mask))
    assert jaxpr.count("pallas_call") == len(TINY.encoder_layer_types)
    assert "pallas_call" not in str(jax.make_jaxpr(ref.encode)(ids, mask))
    real = mask.astype(bool)
    flash_states, ref_states = (np.asarray(_jit(m, lambda m, i, k: m.encode(i, k), ids, mask)) for m in (flash, ref))
    np.testing.assert_allclose(flash_states[real], ref_states[real], atol=2e-5, rtol=0)
    auto = build_model(TINY, seed=4, options=ModelOptions(tpu_mlp="xla"))
    einsum_on_tpu = build_model(TINY, seed=4, options=ModelOptions(tpu_attention="xla", tpu_mlp="xla"))
    assert "pallas_call" in str(jax.make_jaxpr(auto.encode)(ids, mask))  # the TPU branch of the platform switch
    assert "pallas_call" not in str(jax.make_jaxpr(einsum_on_tpu.encode)(ids, mask))
    assert dispatch.resolve_attention_impl("auto", jnp.bfloat16, 256, tpu="xla") == "xla"


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'; valid: \['auto', 'xla'"):
        ModelOptions(attention_impl="flash")
    with pytest.raises(ValueError, match=r"tpu_attention='splash'; valid: \['flash', 'xla'\]"):
        ModelOptions(tpu_attention="splash")
    with pytest.raises(ValueError, match="scan_unroll=0"):
        ModelOptions(scan_unroll=0)
    model = build_model(TINY, abstract=True)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        model.attention_impl = "cuda"
    assert model.options == ModelOptions()


def test_head_margin_is_the_full_vocabulary_logit_difference():
    """`head.margin` (the two embedding rows) equals logit(yes) - logit(no) of the full-vocabulary LM head at
    the last real token, soft-capped, in fp32 and bf16 compute; `score_margin` (the last layer run for the last
    token only) gives it too."""
    cfg = dataclasses.replace(TINY, final_logit_softcapping=3.0)
    ids, mask = _tokens(4, 3, 16, [16, 9, 12])
    dec, dmask = _tokens(5, 3, 10, [10, 4, 7])
    last = dmask.sum(1) - 1
    rows = np.arange(3)

    def outputs(m, ids, mask, dec, dmask):
        states = m.encode(ids, mask)
        logits = m.decoder_logits(dec, dmask, states, mask)[rows, last]
        hidden = m.decode(dec, dmask, states, mask)[rows, last]
        margin = head.margin(hidden, m.embedding.get_value(), 7, 9, dtype=m.dtype, cap=3.0)
        return logits, margin, m.score_margin(dec, dmask, states, mask, 7, 9)

    for dtype in ("float32", "bfloat16"):
        logits, margin, scored = _jit(build_model(cfg, seed=6, dtype=dtype), outputs, ids, mask, dec, dmask)
        assert np.abs(logits).max() <= 3.0 and margin.dtype == jnp.float32
        np.testing.assert_allclose(margin, logits[:, 7] - logits[:, 9], atol=1e-5, rtol=0, err_msg=dtype)
        if dtype == "float32":
            np.testing.assert_allclose(scored, logits[:, 7] - logits[:, 9], atol=2e-5, rtol=0)
    hidden = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    table = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    raw = hidden @ table.T
    np.testing.assert_allclose(head.yes_no_logits(hidden, table, 3, 1), raw[:, [3, 1]], atol=1e-5)
    capped = np.tanh(raw / 2.0) * 2.0
    np.testing.assert_allclose(head.margin(hidden, table, 3, 1, cap=2.0), capped[:, 3] - capped[:, 1], atol=1e-6)
