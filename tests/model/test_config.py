"""Presets, parameter counts (without allocation) and the HF config.json mapping."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from kalm_jax.model import config as C
from kalm_jax.model.build import build_model
from kalm_jax.model.t5gemma2 import count_params

# Published figures: the KaLM-Reranker-V1 model cards (https://huggingface.co/KaLM-Embedding; non-embedding
# params per stack, embedding params) and the T5Gemma 2 text-parameter totals (embedding once, no vision tower)
# implied by the checkpoints' shapes in transformers `models/t5gemma2`.
PUBLISHED = {
    "nano": dict(stack_m=100, emb_m=168, total=368_424_832, layers=18),
    "small": dict(stack_m=698, emb_m=302, total=1_697_783_168, layers=26),
    "large": dict(stack_m=3209, emb_m=671, total=7_089_112_576, layers=34),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_eval_shape_param_counts_match_published(name):
    cfg = C.get_preset(name)
    model = build_model(cfg, abstract=True, param_dtype="bfloat16")
    leaves = jax.tree.leaves(model)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves if hasattr(x, "shape")), "allocated"
    counts = count_params(model)
    enc = counts["encoder"] + counts["encoder_norm"]
    dec = counts["decoder"] + counts["decoder_norm"]
    emb = counts["embedding"]
    pub = PUBLISHED[name]
    assert round(enc / 1e6) == pub["stack_m"] and round(dec / 1e6) == pub["stack_m"]
    assert round(emb / 1e6) == pub["emb_m"]
    assert sum(counts.values()) == pub["total"]
    assert cfg.num_encoder_layers == pub["layers"]
    assert cfg.param_counts()["total"] == pub["total"]


def test_nano_layer_pattern_and_rope():
    cfg = C.get_preset("nano")
    full = [i for i, t in enumerate(cfg.encoder_layer_types) if t == C.FULL]
    assert full == [5, 11, 17]
    assert (cfg.rope_global_factor, cfg.rope_global_theta, cfg.rope_local_theta) == (8.0, 1e6, 1e4)
    assert cfg.sliding_window == 512 and cfg.attn_scale == 1 / 16


def test_from_hf_reads_transformers_config(tiny_hf):
    d, torch_model = tiny_hf
    raw = json.loads((d / "config.json").read_text())
    cfg = C.ModelConfig.from_hf(raw)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_window) == (4, 2, 32, 4)
    assert cfg.encoder_layer_types == ("sliding_attention", "full_attention")
    assert cfg.rope_global_factor == 8.0 and cfg.eoi_token_index == 501
    again = C.ModelConfig.from_hf(cfg.to_hf())
    assert again == cfg


def test_to_hf_is_loadable_by_transformers():
    from transformers import T5Gemma2Config

    cfg = C.get_preset("tiny")
    hf_cfg = T5Gemma2Config(**{k: v for k, v in cfg.to_hf().items() if k != "model_type"})
    assert hf_cfg.decoder.num_hidden_layers == 2
    assert hf_cfg.encoder.text_config.rope_parameters["full_attention"]["factor"] == 8.0
    assert C.ModelConfig.from_hf(json.loads(hf_cfg.to_json_string())) == cfg


def test_other_model_type_is_rejected():
    with pytest.raises(ValueError, match="model_type is 'gemma3'"):
        C.ModelConfig.from_hf({"model_type": "gemma3"})


@pytest.mark.parametrize("bad", ["float16", "fp16", "int8", "bf17"])
def test_bad_dtype_names(bad):
    with pytest.raises(ValueError, match="float16 is unsupported|unknown dtype|unsupported dtype"):
        C.parse_dtype(bad)


def test_dtype_aliases():
    assert C.parse_dtype("bf16") == np.dtype("bfloat16")
    assert C.parse_dtype("float32") == np.float32
    assert float(C.embed_scale(640, "bfloat16")) == 25.25
