"""The package as users install it: a wheel built from the checkout, installed into a fresh virtual environment
with the core dependencies only, used from a directory outside the checkout.

Every console command answers ``--help`` (configs are package data), a command that needs an extra names the
``pip install`` to run in one line, ``kalm-convert inspect`` reads a Hub checkpoint, and
``Reranker.from_pretrained`` ranks with it. The environment installs from the package index (pip's cache makes
repeated runs quick).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

COMMANDS = (
    "kalm-train",
    "kalm-eval",
    "kalm-convert",
    "kalm-export",
    "kalm-label",
    "kalm-aot",
    "kalm-bench",
    "kalm-bm25",
    "kalm-negatives",
    "kalm-tfds-build",
    "kalm-tokenizer",
    "kalm-verify-release",
    "kalm-report",
    "kalm-compare",
    "kalm-launch",
    "kalm-mteb",
    "kalm-mteb-bench",
    "kalm-serve",
)


def _scripts() -> list[str]:
    import tomllib

    return sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "JAX_", "XLA_"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with the wheel of this checkout and its core dependencies."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "kalm_jax", src / "kalm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root / "dist"),
            str(src),
        ],
        check=True,
        timeout=300,
    )
    wheel = next((root / "dist").glob("kalm_jax-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        timeout=900,
        env=_env(venv),
        cwd=root,
    )
    return venv


def test_every_console_command_is_installed_and_answers_help(core_venv, tmp_path):
    assert _scripts() == sorted(COMMANDS)
    for command in COMMANDS:
        r = subprocess.run(
            [str(core_venv / "bin" / command), "--help"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env=_env(core_venv),
        )
        assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-2000:])
        assert "usage" in r.stdout.lower(), (command, r.stdout[:500])
        assert "Traceback" not in r.stderr, (command, r.stderr[-2000:])


def test_packaged_configs_are_found_outside_the_checkout(core_venv, tmp_path):
    """A bare config name means the package's file, from any directory (a user's own file is a path)."""
    r = subprocess.run(
        [str(core_venv / "bin" / "kalm-train"), "--config=train.py:nano", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_env(core_venv),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "site-packages" in r.stdout and "preset: nano" in r.stdout, r.stdout[:1500]


def test_a_command_needing_an_extra_names_the_install_in_one_line(core_venv, tmp_path, data_dir):
    r = subprocess.run(
        [
            str(core_venv / "bin" / "kalm-eval"),
            f"--config.data_dir={data_dir}",
            "--config.datasets=scifact",
            f"--config.output_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_env(core_venv),
    )
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert lines and "pip install 'kalm-jax[eval]'" in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_core_install_converts_and_ranks_with_a_hub_checkpoint(core_venv, hub_checkpoint, tmp_path):
    hub_checkpoint, _ = hub_checkpoint
    r = subprocess.run(
        [str(core_venv / "bin" / "kalm-convert"), "inspect", str(hub_checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_env(core_venv),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "t5gemma2" in r.stdout.lower() or "layers" in r.stdout.lower(), r.stdout[:2000]
    script = textwrap.dedent(f"""
        import json, sys
        from kalm_jax import Reranker
        r = Reranker.from_pretrained({str(hub_checkpoint)!r})
        ranked = r.rank("what reduces fever?", ["Aspirin reduces fever.", "The sky is blue.", "Paris is big."])
        mods = sorted(m.split(".")[0] for m in sys.modules)
        print(json.dumps({{"ranked": ranked, "file": __import__("kalm_jax").__file__,
                           "torch": "torch" in mods, "grain": "grain" in mods}}))
    """)
    r = subprocess.run(
        [str(core_venv / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=_env(core_venv),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert str(core_venv) in out["file"], out["file"]  # the installed wheel, not the checkout
    assert not out["torch"] and not out["grain"]
    assert sorted(x["corpus_id"] for x in out["ranked"]) == [0, 1, 2]
    assert all(0.0 <= x["score"] <= 1.0 for x in out["ranked"])
