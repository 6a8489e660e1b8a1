"""config.json validation: every field's type and range is checked up front, with the file and field named."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
from child_process import child_env

from kalm_jax.checkpoints import hf
from kalm_jax.model.config import ModelConfig, get_preset


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


@pytest.mark.parametrize(
    "section,key,value,needle",
    [
        ("decoder", "final_logit_softcapping", 0, "final_logit_softcapping"),
        ("decoder", "attn_logit_softcapping", -1.0, "attn_logit_softcapping"),
        ("decoder", "eos_token_id", [], "eos_token_id is an empty list"),
        ("rope", "rope_theta", 0.0, "rope_global_theta|rope_theta"),
        ("rope", "rope_theta", -5.0, "rope_global_theta|rope_theta"),
    ],
)
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
        ModelConfig(
            **{
                **{
                    f: getattr(get_preset("tiny"), f)
                    for f in (
                        "vocab_size",
                        "hidden_size",
                        "intermediate_size",
                        "num_kv_heads",
                        "head_dim",
                        "encoder_layer_types",
                        "decoder_layer_types",
                        "sliding_window",
                    )
                },
                "num_heads": 0,
            }
        )


# ---------------------------------------------------------------------- training config, qrels, devices
@pytest.mark.parametrize(
    "key,value",
    [
        ("total_steps", -1),
        ("total_steps", 0),
        ("optimizer.lr", -1e-4),
        ("optimizer.grad_accum_steps", 0),
        ("data.batch_size", 0),
        ("checkpoint.keep", 0),
        ("optimizer.b2", 1.5),
        ("log_every", 0),
        ("loss.listwise_temperature", 0.0),
        ("optimizer.lr", float("nan")),
    ],
)
def test_training_config_ranges_are_named(key, value):
    from kalm_jax.training.config import default_config, validate

    c = default_config()
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(c)


@pytest.mark.parametrize(
    "rows,needle",
    [
        ("q1\td1\t0.9\n", r"qrels.tsv:2: relevance '0.9' is not an integer grade"),
        ("q1\td1\tinf\n", r"qrels.tsv:2: relevance 'inf' is not an integer grade"),
        ("q1\td1\tnan\n", r"qrels.tsv:2: relevance 'nan'"),
        ("q1\td1\t1\nq1\td2\t0\nq1\td1\t2\n", r"qrels.tsv:4: query 'q1' doc 'd1' judged 2 here but 1 on line 2"),
    ],
)
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
    from kalm_jax.inference.engine import InferenceEngine
    from kalm_jax.model.build import build_model

    with pytest.raises(ValueError, match="devices is empty"):
        InferenceEngine(build_model(get_preset("tiny"), seed=0), devices=[])


# ---------------------------------------------------------------------- every config value, before data preparation
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("mep.ratios", (1.5,), r"mep\.ratios must be integers >= 1, got \[1\.5\]"),
        ("mep.ratios", (1, 1), r"mep\.ratios must not repeat a ratio .* got \(1, 1\)"),
        ("mep.ratios", (0, 4), r"mep\.ratios must be integers >= 1, got \[0\]"),
        (
            "mep.weights",
            (0.0, 0.0, 0.0),
            r"mep\.weights must give at least one ratio a weight > 0 .* got \(0\.0, 0\.0, 0\.0\)",
        ),
        ("epochs", -1.0, r"epochs must be >= 0, got -1\.0"),
        ("epochs", float("nan"), r"epochs must be a finite number, got nan"),
        ("model.preset", "huge", r"model\.preset must be one of \['large', 'nano', 'small', 'tiny'\], got 'huge'"),
        ("model.param_dtype", "int8", r"model\.param_dtype must be one of \('float32', 'bfloat16'\), got 'int8'"),
        ("model.compute_dtype", "float16", r"model\.compute_dtype must be one of .* got 'float16'"),
        ("mesh.data", 0, r"mesh\.data must be a positive integer or -1 .* got 0"),
        ("data.decoder_length", 5, r"data\.decoder_length must be 0 .* or at least \d+ .* got 5"),
        ("checkpoint.every", 0, r"checkpoint\.every must be >= 1, got 0"),
    ],
)
def test_training_config_values_are_validated(key, value, needle):
    """Each value is refused by `validate` (run by train.py before any data preparation) with the key, the value
    and what is allowed; the tiny preset (ratios 1, 4, 16) is valid as it is."""
    from kalm_jax.cli import ConfigError, load_file
    from kalm_jax.training.config import validate

    c = load_file(CONFIGS / "train.py:tiny")
    validate(c)
    section, _, leaf = key.rpartition(".")
    with (c[section] if section else c).unlocked():
        (c[section] if section else c)[leaf] = value
    with pytest.raises(ConfigError, match=needle):
        validate(c)


@pytest.mark.parametrize(
    "arg,needle",
    [
        ("small,tiny", r"\['small', 'tiny'\] name more than one size"),
        ("stage1,stage2", r"\['stage1', 'stage2'\] name more than one stage"),
    ],
)
def test_train_config_refuses_two_sizes_or_two_stages(arg, needle):
    from kalm_jax.cli import ConfigError, load_file

    with pytest.raises(ConfigError, match=needle):
        load_file(CONFIGS / f"train.py:{arg}")
    assert load_file(CONFIGS / "train.py:stage2,small").model.preset == "small"


@pytest.mark.parametrize("cascade", ["16:0", "0:20"])
def test_eval_cascade_needs_a_coarse_ratio_and_a_kept_count(tmp_path, cascade):
    from kalm_jax.evaluation.settings import Settings, SweepConfigError

    cfg = {
        "data_dir": str(tmp_path),
        "datasets": "x",
        "output_dir": str(tmp_path / "o"),
        "ratios": "4",
        "cascade": cascade,
    }
    with pytest.raises(SweepConfigError, match=f"KEEP >= 1 .* got '{cascade}'"):
        Settings.from_config(cfg)
    assert Settings.from_config(dict(cfg, cascade="16:20")).cascade_pair == (16, 20)


def test_train_cli_refuses_a_bad_value_before_preparing_data(tmp_path, data_dir):
    """The user's command exits 2 with the named error in seconds, and the workdir gets nothing (no mined data,
    no tokenizer): before the fix `mep.ratios=(1,1)` mined negatives and trained ratio 1 twice."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = child_env(KALM_DATA_DIR=str(data_dir))
    w = tmp_path / "w"
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            str(repo / "train.py"),
            f"--config={repo}/configs/train.py:tiny",
            f"--workdir={w}",
            "--config.mep.ratios=(1,1)",
            "--config.tensorboard=False",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: mep.ratios must not repeat a ratio" in r.stderr and "got (1, 1)" in r.stderr
    assert "Traceback" not in r.stderr
    assert not w.exists() or not any(w.iterdir())
    assert time.perf_counter() - t0 < 180
