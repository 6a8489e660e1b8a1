"""Conversion and HF loading: output == input refused, contradictory flags, one-line CLI errors, disk full
named, weights of the wrong dtype or non-finite refused, index entries leaving the checkpoint refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kalm_jax.checkpoints import hf, orbax_io
from kalm_jax.checkpoints.safetensors_io import DiskFullError, Entry, write_safetensors
from kalm_jax.cli import convert as convert_cli


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
        assert convert_cli.main(["from-hf", str(hf_copy), str(out), "--config.overwrite=true"]) == 2
        assert "destroy the input" in capsys.readouterr().err
    assert snapshot(hf_copy) == before


def test_to_hf_onto_its_own_input_and_contradictory_flags_are_refused(hf_copy, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert convert_cli.main(["from-hf", str(hf_copy), str(ck)]) == 0
    before = snapshot(ck)
    assert convert_cli.main(["to-hf", str(ck), str(ck), "--config.overwrite=true"]) == 2
    assert "destroy the input" in capsys.readouterr().err
    assert (
        convert_cli.main(["to-hf", str(ck), str(hf_copy), "--config.overwrite=true"]) == 2
    )  # the model's own HF source
    assert "destroy the input" in capsys.readouterr().err
    assert (
        convert_cli.main(
            ["to-hf", str(ck), str(tmp_path / "o"), "--config.text_only=true", "--config.vision_from", str(hf_copy)]
        )
        == 2
    )
    assert "text_only and vision_from" in capsys.readouterr().err
    assert snapshot(ck) == before and not (tmp_path / "o").exists()


def test_cli_prints_one_line_for_any_error(hf_copy, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("tensorstore said no\n" + "spec " * 2000)

    monkeypatch.setattr(hf, "load", boom)
    assert convert_cli.main(["from-hf", str(hf_copy), str(tmp_path / "o")]) == 2
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
    f = f.rename(hf_copy / "model-00001-of-00001.safetensors")  # model.safetensors would win over the index
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
    cfg, _ = orbax_io.load_any(hf_copy / "config.json")
    assert cfg == hf.read_config(hf_copy)


# --------------------------------------------------------------- which files an HF directory's weights come from
@pytest.fixture(scope="module")
def other_hf(tmp_path_factory):
    """The tiny checkpoint's architecture with other random weights (seed 1): what a stray file holds."""
    from torch_reference import build_tiny_hf

    d = tmp_path_factory.mktemp("other_hf")
    build_tiny_hf(d, seed=1, heads=4, kv_heads=2, window=4)
    return load_file(d / "model.safetensors")


def transformers_weights(d: Path) -> dict[str, np.ndarray]:
    """What transformers itself loads from `d`, under the checkpoint's tensor names (saved back by it)."""
    import tempfile

    from transformers import T5Gemma2ForConditionalGeneration

    model = T5Gemma2ForConditionalGeneration.from_pretrained(d)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        tensors = {}
        for f in sorted(Path(out).glob("*.safetensors")):
            tensors.update(load_file(f))
    return tensors


def our_weights(d: Path, out: Path) -> dict[str, np.ndarray]:
    """What `hf.load` loads from `d`, written back by `hf.save` (float32, exact) under the same names."""
    cfg, model = hf.load(d)
    hf.save(model, cfg, out, dtype="float32")
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def write_shards(d: Path, tensors: dict, extra: dict | None = None, weight_map: dict | None = None) -> list[Path]:
    """`tensors` in two shards + model.safetensors.index.json (`extra`: more tensors in the second shard only)."""
    names = sorted(tensors)
    files = [d / "model-00001-of-00002.safetensors", d / "model-00002-of-00002.safetensors"]
    halves = [{n: tensors[n] for n in names[: len(names) // 2]}, {n: tensors[n] for n in names[len(names) // 2 :]}]
    halves[1].update(extra or {})
    for f, half in zip(files, halves):
        save_file(half, f, metadata={"format": "pt"})
    wm = {n: files[i].name for i, half in enumerate(halves) for n in half if i == 0 or n not in (extra or {})}
    wm.update(weight_map or {})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return files


@pytest.mark.parametrize("case", ["stale_index", "stray_file", "unlisted_shard", "transformers_weights"])
def test_weights_come_from_the_files_transformers_reads(hf_copy, other_hf, tmp_path, case):
    base = load_file(hf_copy / "model.safetensors")
    if case == "stale_index":  # model.safetensors wins over an index beside it (whose shards hold other weights)
        write_shards(hf_copy, other_hf)
    elif case == "stray_file":  # a second *.safetensors beside model.safetensors is not read
        save_file(other_hf, hf_copy / "stray.safetensors", metadata={"format": "pt"})
    elif case == "unlisted_shard":  # with an index, only the shards it names are read
        (hf_copy / "model.safetensors").unlink()
        write_shards(hf_copy, base)
        save_file(other_hf, hf_copy / "zz-model-00003-of-00002.safetensors", metadata={"format": "pt"})
    else:  # config.json's transformers_weights comes first
        (hf_copy / "model.safetensors").rename(hf_copy / "a.safetensors")
        save_file(other_hf, hf_copy / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((hf_copy / "config.json").read_text())
        (hf_copy / "config.json").write_text(json.dumps(dict(cfg, transformers_weights="a.safetensors")))
    theirs = transformers_weights(hf_copy)
    ours = our_weights(hf_copy, tmp_path / "out")
    assert set(ours) <= set(theirs) and len(ours) > 50
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
        np.testing.assert_array_equal(value, base[name], err_msg=name)  # the checkpoint's weights, not the stray ones


def test_a_directory_transformers_cannot_load_is_refused(hf_copy):
    (hf_copy / "model.safetensors").rename(hf_copy / "weights.safetensors")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        transformers_weights(hf_copy)
    with pytest.raises(
        FileNotFoundError,
        match=r"no model.safetensors and no model.safetensors.index.json; "
        r"transformers does not load .*weights.safetensors",
    ):
        hf.load(hf_copy)


def test_a_tensor_in_two_shards_is_refused_naming_both_files(hf_copy, other_hf):
    base = load_file(hf_copy / "model.safetensors")
    (hf_copy / "model.safetensors").unlink()
    name = sorted(base)[0]  # in the first shard, and a different copy in the second
    files = write_shards(hf_copy, base, extra={name: other_hf[name]})
    theirs = transformers_weights(hf_copy)  # transformers silently takes the later file's copy
    np.testing.assert_array_equal(theirs[name], other_hf[name])
    with pytest.raises(ValueError, match=rf"tensor {name} is stored in two shard files, {files[0]} and {files[1]}"):
        hf.load(hf_copy)


def test_an_index_pointing_a_tensor_at_the_wrong_shard_names_tensor_index_and_shard(hf_copy, capsys):
    base = load_file(hf_copy / "model.safetensors")
    (hf_copy / "model.safetensors").unlink()
    name = sorted(base)[0]  # stored in the first shard, mapped to the second
    files = write_shards(hf_copy, base, weight_map={name: "model-00002-of-00002.safetensors"})
    index = hf_copy / "model.safetensors.index.json"
    with pytest.raises(
        ValueError,
        match=rf"{index} maps tensor {name} to {files[1]}, which does not hold it "
        rf"\(it is in {files[0]}\)",
    ):
        hf.load(hf_copy)
    assert convert_cli.main(["inspect", str(hf_copy)]) == 2  # the CLI reports it on one line
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"maps tensor {name} to {files[1]}" in err
