"""The one config entry: every CLI takes `--config=FILE[:ARG]` and `--config.KEY=VALUE` the same way, parses values
as the field's type, and rejects an unknown key (exit 2) naming the valid keys of its section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from child_process import child_env

from kalm_jax import cli

REPO = Path(__file__).resolve().parents[2]


def _env():
    return child_env()


# Every CLI, as a user runs it. Each is given a typo'd key in a section and must name it with the valid keys.
CLIS = {
    "train.py": (
        [sys.executable, str(REPO / "train.py"), "--workdir=unused"],
        "optimizer.lrr",
        "optimizer",
        "'warmup_steps'",
    ),
    "eval.py": ([sys.executable, str(REPO / "eval.py")], "ratioz", "<top level>", "'ratios'"),
    "label": ([sys.executable, "-m", "kalm_jax.cli.label"], "teachr", "<top level>", "'teacher'"),
    "convert": (
        [sys.executable, "-m", "kalm_jax.cli.convert", "inspect", "x"],
        "againts",
        "<top level>",
        "'against'",
    ),
    "aot": ([sys.executable, "-m", "kalm_jax.cli.aot"], "mesh.fsdpp", "mesh", "'fsdp'"),
    "bench": ([sys.executable, "-m", "kalm_jax.cli.bench"], "shapez", "<top level>", "'shapes'"),
    "bm25": ([sys.executable, "-m", "kalm_jax.cli.bm25"], "k2", "<top level>", "'k1'"),
    "mteb": ([sys.executable, "-m", "kalm_jax.mteb"], "taks", "<top level>", "'tasks'"),
    "serve": ([sys.executable, "-m", "kalm_jax.cli.serve"], "prot", "<top level>", "'port'"),
    "negatives": ([sys.executable, "-m", "kalm_jax.cli.negatives"], "num_negative", "<top level>", "'num_negatives'"),
    "tfds_builder": ([sys.executable, "-m", "kalm_jax.cli.tfds_build"], "validaton", "<top level>", "'validation'"),
    "tokenizer": ([sys.executable, "-m", "kalm_jax.cli.tokenizer"], "no_gemma_layout", "<top level>", "'gemma_layout'"),
    "compare": ([sys.executable, "-m", "kalm_jax.cli.compare", "a", "b"], "outpt", "<top level>", "'output'"),
}


@pytest.mark.parametrize("name", sorted(CLIS))
def test_every_cli_rejects_an_unknown_key_with_the_valid_keys(name):
    argv, key, section, valid = CLIS[name]
    r = subprocess.run([*argv, f"--config.{key}=1"], env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f"unknown config key --config.{key}" in r.stderr and f"{section} has no" in r.stderr, r.stderr[-2000:]
    assert valid in r.stderr


def test_values_are_parsed_as_the_fields_type(tmp_path):
    config, flags = cli.parse(
        [
            "--config.optimizer.lr=1e-4",
            "--config.mep.ratios=2,8,32",
            "--config.lora.enabled=true",
            "--config.data.train_jsonl=('a.jsonl','b.jsonl')",
            "--config.total_steps",
            "7",
            "--workdir",
            str(tmp_path),
        ],
        "train.py:tiny",
        flags=[cli.Flag("workdir")],
    )
    assert config.optimizer.lr == 1e-4 and tuple(config.mep.ratios) == (2, 8, 32) and config.lora.enabled is True
    assert tuple(config.data.train_jsonl) == ("a.jsonl", "b.jsonl") and config.total_steps == 7
    assert flags == {"workdir": str(tmp_path)}
    with pytest.raises(cli.ConfigError, match="expected an integer"):
        cli.parse(["--config.total_steps=many"], "train.py:tiny")
    with pytest.raises(cli.ConfigError, match="expected a boolean"):
        cli.parse(["--config.lora.enabled=maybe"], "train.py:tiny")
    with pytest.raises(cli.ConfigError, match="is a section"):
        cli.parse(["--config.optimizer=1"], "train.py:tiny")
    with pytest.raises(cli.ConfigError, match="no such config file"):
        cli.parse(["--config=configs/nope.py"], "train.py:tiny")
    with pytest.raises(cli.ConfigError, match="unknown config preset"):
        cli.parse([f"--config={REPO}/configs/train.py:huge"], "")
    with pytest.raises(cli.ConfigError, match="unexpected arguments"):
        cli.parse(["a", "b", "c", "d"], "convert.py", positional=("command", "source", "output"))
    config, _ = cli.parse(
        ["to-hf", "src", "out", "--config.dtype=float32"], "convert.py", positional=("command", "source", "output")
    )
    assert (config.command, config.source, config.output, config.dtype) == ("to-hf", "src", "out", "float32")


def test_every_default_lives_in_configs():
    """Each CLI's default config file exists and loads."""
    for name in (
        "train.py:tiny",
        "eval.py",
        "label.py",
        "convert.py",
        "tpu.py:nano,v5e-4",
        "bench.py",
        "bm25.py",
        "mteb.py",
        "serve.py",
        "negatives.py",
        "tfds_builder.py",
        "tokenizer.py",
        "report.py",
        "compare.py",
    ):
        assert cli.load_file(cli.config_file(name)) is not None, name


@pytest.mark.parametrize(
    "module, missing",
    [
        ("kalm_jax.cli.bm25", "data_dir"),
        ("kalm_jax.cli.negatives", "data_dir"),
        ("kalm_jax.cli.tfds_build", "train"),
        ("kalm_jax.cli.tokenizer", "out"),
    ],
)
def test_data_clis_name_a_missing_required_field(module, missing, capsys):
    """The data CLIs run in-process: an empty required field exits 2 with one line naming it."""
    import importlib

    assert importlib.import_module(module).main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --config.{missing} is required") and "\n" not in err, err


def test_a_bare_config_name_means_configs_even_from_the_repository_root(tmp_path):
    """`--config=train.py:tiny` run from the repository root (where the script train.py is) loads configs/train.py,
    as the docstring says; before the fix it loaded the script and failed with "has no get_config()"."""
    w = tmp_path / "w"
    r = subprocess.run(
        [sys.executable, "train.py", "--config=train.py:tiny", f"--workdir={w}", "--config.total_steps=0"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "total_steps must be >= 1, got 0" in r.stderr  # the tiny config was loaded and validated
    assert "get_config" not in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kalm_jax import cli; c = cli.load_file('train.py:tiny'); print(c.model.preset, c.total_steps)",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0 and r.stdout.split() == ["tiny", "150"], r.stderr[-2000:]


def test_a_users_config_file_is_a_path(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text(
        "import ml_collections\n\ndef get_config(arg=''):\n    return ml_collections.ConfigDict({'arg': arg})\n"
    )
    monkeypatch.chdir(tmp_path)
    assert cli.load_file("./mine.py:x").arg == "x"
    assert cli.load_file(str(tmp_path / "mine.py")).arg == ""
    with pytest.raises(
        cli.ConfigError,
        match=r"no config file 'mine.py' in the package's configs .* a file of your "
        r"own is a path, e.g. ./mine.py",
    ):
        cli.load_file("mine.py")
