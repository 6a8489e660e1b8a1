"""Conversion and HF loading: output == input refused, contradictory flags, one-line CLI errors, disk full
named, weights of the wrong dtype or non-finite refused, index entries leaving the checkpoint refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kalm_jax import checkpointing, convert, hf
from kalm_jax.safetensors_io import DiskFullError, Entry, write_safetensors


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture()
def hf_copy(tiny_hf, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(tiny_hf[0], d)
    return d


def one_file(d: Path) -> Path:
    files = sorted(d.glob("*.safetensors"))
    assert len(files) == 1
    return files[0]


def test_from_hf_onto_its_own_input_is_refused(hf_copy, tmp_path, capsys):
    before = snapshot(hf_copy)
    link = tmp_path / "link"
    link.symlink_to(hf_copy)
    for out in (hf_copy, link, tmp_path / "hf" / ".." / "hf", tmp_path):
        assert convert.main(["from-hf", str(hf_copy), str(out), "--config.overwrite=true"]) == 2
        assert "destroy the input" in capsys.readouterr().err
    assert snapshot(hf_copy) == before


def test_to_hf_onto_its_own_input_and_contradictory_flags_are_refused(hf_copy, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert convert.main(["from-hf", str(hf_copy), str(ck)]) == 0
    before = snapshot(ck)
    assert convert.main(["to-hf", str(ck), str(ck), "--config.overwrite=true"]) == 2
    assert "destroy the input" in capsys.readouterr().err
    assert convert.main(["to-hf", str(ck), str(hf_copy), "--config.overwrite=true"]) == 2  # the model's own HF source
    assert "destroy the input" in capsys.readouterr().err
    assert convert.main(["to-hf", str(ck), str(tmp_path / "o"), "--config.text_only=true", "--config.vision_from", str(hf_copy)]) == 2
    assert "text_only and vision_from" in capsys.readouterr().err
    assert snapshot(ck) == before and not (tmp_path / "o").exists()


def test_cli_prints_one_line_for_any_error(hf_copy, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("tensorstore said no\n" + "spec " * 2000)

    monkeypatch.setattr(hf, "load", boom)
    assert convert.main(["from-hf", str(hf_copy), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: RuntimeError: tensorstore said no"


def test_disk_full_names_the_file():
    class Bar:
        def update(self, n):
            pass

    data = np.ones((1 << 16,), np.float32)
    with pytest.raises(DiskFullError, match="/dev/full: the disk is full"):
        write_safetensors(Path("/dev/full"), [Entry("w", "F32", data.shape, data.nbytes, lambda: data)], Bar())


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.int32])
def test_integer_or_bool_weights_are_refused(hf_copy, dtype):
    f = one_file(hf_copy)
    tensors = load_file(f)
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = np.ones(tensors[name].shape, dtype)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}: stored as (I64|BOOL|I32); model weights must be floating"):
        hf.load(hf_copy)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(hf_copy, bad):
    f = one_file(hf_copy)
    tensors = load_file(f)
    name = next(n for n in tensors if n.endswith("k_proj.weight"))
    tensors[name][0, 0] = bad
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor {name} holds 1 non-finite"):
        hf.load(hf_copy)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_entries_leaving_the_checkpoint_are_refused(hf_copy, target):
    f = one_file(hf_copy)
    names = list(load_file(f))
    weight_map = {n: f.name for n in names}
    weight_map[names[0]] = target
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match="refusing to follow it"):
        hf.load(hf_copy)


def test_corrupt_safetensors_error_names_the_file(hf_copy):
    f = one_file(hf_copy)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header}")
    with pytest.raises(ValueError, match=str(f)):
        hf.load(hf_copy)


def test_load_any_accepts_a_file_inside_an_hf_checkpoint(hf_copy):
    cfg, _ = checkpointing.load_any(hf_copy / "config.json")
    assert cfg == hf.read_config(hf_copy)
