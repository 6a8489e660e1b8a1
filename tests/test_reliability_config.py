"""config.json validation: every field's type and range is checked up front, with the file and field named."""

from __future__ import annotations

import copy
import json
import time

import pytest

from kalm_jax import hf
from kalm_jax.config import ModelConfig, get_preset


@pytest.fixture(scope="module")
def hf_dict():
    return get_preset("tiny").to_hf()


def load(d: dict, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return hf.read_config(tmp_path)


CASES = [
    ("rms_norm_eps", float("nan"), "rms_norm_eps"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps"),
    ("vocab_size", 8192.5, "vocab_size must be an integer"),
    ("vocab_size", "8192", "vocab_size must be an integer"),
    ("query_pre_attn_scalar", 0, "query_pre_attn_scalar"),
    ("query_pre_attn_scalar", -4, "query_pre_attn_scalar"),
    ("sliding_window", 10**12, "sliding_window"),
    ("num_hidden_layers", 10**6, "num_hidden_layers"),
    ("num_hidden_layers", [], "num_hidden_layers must be an integer"),
    ("hidden_size", True, "hidden_size must be an integer"),
    ("pad_token_id", 10**5, "pad_token_id"),
]


@pytest.mark.parametrize("key,value,needle", CASES)
def test_bad_text_field_is_named(hf_dict, tmp_path, key, value, needle):
    d = copy.deepcopy(hf_dict)
    d["encoder"]["text_config"][key] = value
    if key not in ("num_hidden_layers",):
        d["decoder"][key] = value
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=needle) as e:
        load(d, tmp_path)
    assert "config.json" in str(e.value)
    assert time.perf_counter() - t0 < 2  # rejected before anything is allocated


@pytest.mark.parametrize("section,key,value,needle", [
    ("decoder", "final_logit_softcapping", 0, "final_logit_softcapping"),
    ("decoder", "attn_logit_softcapping", -1.0, "attn_logit_softcapping"),
    ("decoder", "eos_token_id", [], "eos_token_id is an empty list"),
    ("rope", "rope_theta", 0.0, "rope_global_theta|rope_theta"),
    ("rope", "rope_theta", -5.0, "rope_global_theta|rope_theta"),
])
def test_bad_decoder_and_rope_fields_are_named(hf_dict, tmp_path, section, key, value, needle):
    d = copy.deepcopy(hf_dict)
    if section == "rope":
        for part in (d["encoder"]["text_config"], d["decoder"]):
            part["rope_parameters"]["full_attention"][key] = value
    else:
        d["decoder"][key] = value
        if key in d["encoder"]["text_config"]:
            d["encoder"]["text_config"][key] = value
    with pytest.raises(ValueError, match=needle):
        load(d, tmp_path)


def test_deeply_nested_or_non_object_config_is_a_named_error(hf_dict, tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="config.json"):
        hf.read_config(tmp_path)
    d = copy.deepcopy(hf_dict)
    d["encoder"]["text_config"]["layer_types"] = 7
    with pytest.raises(ValueError, match="layer_types must be a list"):
        load(d, tmp_path)


def test_valid_config_round_trips(hf_dict, tmp_path):
    assert load(hf_dict, tmp_path) == get_preset("tiny")
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(**{**{f: getattr(get_preset("tiny"), f) for f in ("vocab_size", "hidden_size",
                    "intermediate_size", "num_kv_heads", "head_dim", "encoder_layer_types", "decoder_layer_types",
                    "sliding_window")}, "num_heads": 0})


# ---------------------------------------------------------------------- training config, qrels, devices
@pytest.mark.parametrize("key,value", [("total_steps", -1), ("total_steps", 0), ("optimizer.lr", -1e-4),
                                       ("optimizer.grad_accum_steps", 0), ("data.batch_size", 0),
                                       ("checkpoint.keep", 0), ("optimizer.b2", 1.5), ("log_every", 0),
                                       ("loss.listwise_temperature", 0.0), ("optimizer.lr", float("nan"))])
def test_training_config_ranges_are_named(key, value):
    from kalm_jax.training.config import default_config, validate

    c = default_config()
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(c)


@pytest.mark.parametrize("rows,needle", [
    ("q1\td1\t0.9\n", r"qrels.tsv:2: relevance '0.9' is not an integer grade"),
    ("q1\td1\tinf\n", r"qrels.tsv:2: relevance 'inf' is not an integer grade"),
    ("q1\td1\tnan\n", r"qrels.tsv:2: relevance 'nan'"),
    ("q1\td1\t1\nq1\td2\t0\nq1\td1\t2\n", r"qrels.tsv:4: query 'q1' doc 'd1' judged 2 here but 1 on line 2"),
])
def test_bad_qrels_name_file_and_line(tmp_path, rows, needle):
    from kalm_jax.data.beir import load_qrels

    path = tmp_path / "qrels.tsv"
    path.write_text("query-id\tcorpus-id\tscore\n" + rows)
    with pytest.raises(ValueError, match=needle):
        load_qrels(path)


def test_identical_duplicate_and_float_grades_are_accepted(tmp_path):
    from kalm_jax.data.beir import load_qrels

    path = tmp_path / "qrels.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2.0\nq1\td1\t2\n")
    assert load_qrels(path) == {"q1": {"d1": 2}}


def test_empty_device_list_is_a_named_error():
    from kalm_jax.engine import InferenceEngine
    from kalm_jax.model import init_model

    with pytest.raises(ValueError, match="devices is empty"):
        InferenceEngine(init_model(get_preset("tiny"), seed=0), devices=[])
