"""Orbax model checkpoints: save/load round trip (with LoRA), load_any dispatch, fingerprints."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from kalm_jax.checkpoints import orbax_io
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(orbax_io.param_tree(model))]


def test_round_trip_with_lora(tmp_path):
    model = build_model(get_preset("tiny"), seed=3)
    model.add_lora(4, 8.0, ("q", "o"), rngs=nnx.Rngs(1))
    b = model.decoder.q_lora_b
    b.set_value(b.get_value() + 0.01)
    path = orbax_io.save_model(model, tmp_path / "ckpt")
    cfg, back = orbax_io.load_model(path)
    assert cfg == model.config and back.has_lora
    for x, y in zip(_leaves(model), _leaves(back)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert orbax_io.fingerprint(model) == orbax_io.fingerprint(back)
    with pytest.raises(FileExistsError):
        orbax_io.save_model(model, path)
    assert not list(tmp_path.glob(".ckpt.tmp-*"))


def test_load_any_dispatch(tiny_hf, tmp_path):
    cfg, model = orbax_io.load_any(tiny_hf[0])
    assert cfg.num_kv_heads == 2
    path = orbax_io.save_model(model, tmp_path / "m")
    cfg2, again = orbax_io.load_any(path, dtype="bfloat16")
    assert again.embedding.get_value().dtype == np.dtype("bfloat16")
    with pytest.raises(ValueError, match="not an HF checkpoint"):
        orbax_io.load_any(tmp_path)
    with pytest.raises(FileNotFoundError):
        orbax_io.load_any(tmp_path / "nope")
    assert orbax_io.fingerprint(model) != orbax_io.fingerprint(build_model(cfg, seed=9))
