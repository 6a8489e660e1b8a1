"""Bad input gets clear errors, never crash dumps from inside XLA."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kalm_jax.checkpoints import hf
from kalm_jax.inference import scoring


@pytest.fixture(scope="module")
def model(tiny_hf):
    return hf.load(tiny_hf[0])[1]


def test_empty_batch(model):
    with pytest.raises(ValueError, match="empty"):
        scoring.encode_passages(model, np.zeros((0, 8), np.int32), np.zeros((0, 8), np.int32), 4)


def test_all_padding_passage(model):
    ids = np.ones((2, 8), np.int32)
    mask = np.ones((2, 8), np.int32)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] are all padding"):
        scoring.encode_passages(model, ids, mask, 4)
    states = np.zeros((2, 3, 64), np.float32)
    pmask = np.ones((2, 3), np.int32)
    pmask[0] = 0
    with pytest.raises(ValueError, match=r"passages \[0\] are all padding"):
        scoring.score(model, ids, np.ones_like(ids), states, pmask, 5, 6)


def test_token_ids_out_of_range(model):
    ids = np.full((1, 4), 3, np.int64)
    ids[0, 2] = 600
    with pytest.raises(ValueError, match=r"input_ids\[0, 2\] = 600 is outside the vocabulary"):
        model.encode(ids, np.ones_like(ids))
    with pytest.raises(ValueError, match="yes_id=512"):
        scoring.score(
            model,
            np.ones((1, 4), np.int32),
            np.ones((1, 4), np.int32),
            np.zeros((1, 2, 64), np.float32),
            np.ones((1, 2), np.int32),
            512,
            3,
        )


def test_ratio_below_one(model):
    ids = np.ones((1, 8), np.int32)
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        scoring.encode_passages(model, ids, ids, 0)


def test_wrong_dtype_name(tiny_hf):
    with pytest.raises(ValueError, match="float16 is unsupported"):
        hf.load(tiny_hf[0], dtype="float16")


def test_other_model_type(tiny_hf, tmp_path):
    shutil.copytree(tiny_hf[0], tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["model_type"] = "t5"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type is 't5', expected 't5gemma2'"):
        hf.load(tmp_path / "ckpt")


def test_missing_and_misshaped_tensors_are_named(tiny_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tiny_hf[0] / "model.safetensors"))
    del tensors["model.decoder.layers.1.mlp.up_proj.weight"]
    tensors["model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 64), np.float32)
    tensors["model.encoder.layers.9.extra.weight"] = np.zeros((2,), np.float32)
    out = tmp_path / "broken"
    out.mkdir()
    shutil.copy(tiny_hf[0] / "config.json", out / "config.json")
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        hf.load(out)
    msg = str(err.value)
    assert "missing tensor model.decoder.layers.1.mlp.up_proj.weight" in msg
    assert "model.encoder.layers.0.self_attn.q_proj.weight has shape (3, 64), expected (128, 64)" in msg
    assert "unexpected tensor model.encoder.layers.9.extra.weight" in msg


def test_sharded_checkpoint_and_vision_passthrough(tiny_hf, tmp_path):
    import torch
    from transformers import T5Gemma2ForConditionalGeneration

    torch_model = T5Gemma2ForConditionalGeneration.from_pretrained(tiny_hf[0])
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, a = hf.load(tiny_hf[0])
    _, b = hf.load(tmp_path / "sharded")
    for (n1, t1), (n2, t2) in zip(hf.iter_hf_tensors(a, "float32"), hf.iter_hf_tensors(b, "float32")):
        assert n1 == n2 and np.array_equal(t1, t2)
    assert any(n.startswith("model.encoder.vision_tower.") for n in b.hf_passthrough)
    ref = dict(torch_model.state_dict())
    name, value = next(hf.iter_hf_tensors(b, "float32"))
    assert np.array_equal(value, ref["model.encoder.text_model.embed_tokens.weight"].numpy())
    del torch
