"""Reliability of training and model checkpoints: a changed setting is an error that touches nothing, only
real corruption (checksums) falls back, nothing is deleted, metrics.jsonl survives a torn line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kalm_jax.checkpoints import integrity, orbax_io
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.parallel import mesh as sharding
from kalm_jax.training.checkpoints import Checkpointer, CorruptCheckpoint, SettingsMismatch
from kalm_jax.training.config import default_config, train_settings
from kalm_jax.training.loop import MetricsWriter
from kalm_jax.training.state import model_kwargs
from kalm_jax.training.step import make_train_step

MC = get_preset("tiny")


def run_config(accum: int = 1):
    c = default_config()
    c.mesh.data = -1
    c.data.batch_size, c.data.group_size, c.data.max_document_tokens, c.data.decoder_length = 8, 2, 16, 16
    c.mep.ratios = (1,)
    c.optimizer.grad_accum_steps = accum
    c.checkpoint.async_save = False
    c.checkpoint.keep = 5
    return c


def train_step(c):
    ts = make_train_step(MC, c, sharding.make_mesh(c.mesh), yes_id=10, no_id=11)
    return ts, ts.init_state(build_model(MC, seed=0, **model_kwargs(c, lora_dtype=c.model.param_dtype)))


@pytest.fixture(scope="module")
def base():
    c = run_config()
    return (c, *train_step(c))


def save_steps(workdir: Path, base, steps=(3, 6), settings=True) -> None:
    c, ts, state = base
    ck = Checkpointer(workdir, c.checkpoint, settings=train_settings(c) if settings else None)
    for s in steps:
        st = dict(state, step=jnp.asarray(s, jnp.int32), params=jax.tree.map(lambda x, s=s: x + s, state["params"]))
        assert ck.save(st, orbax_io.model_meta(ts.model(st)), None, force=True)
    ck.close()


def step_dirs(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name[0].isdigit())


def flip_bytes(step_dir: Path) -> Path:
    """XORs 64 bytes in the middle of the largest params file (a silent bit-flip)."""
    f = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    return f


def test_changed_setting_is_a_named_error_and_deletes_nothing(base, tmp_path):
    save_steps(tmp_path, base)
    c2 = run_config(accum=2)
    ts2, _ = train_step(c2)
    ck = Checkpointer(tmp_path, c2.checkpoint, settings=train_settings(c2))
    with pytest.raises(SettingsMismatch, match=r"optimizer.grad_accum_steps: checkpoint 1, now 2"):
        ck.restore(ts2.abstract_state, None)
    ck.close()
    assert step_dirs(tmp_path) == ["3", "6"]
    assert not (tmp_path / "corrupt_checkpoints").exists()
    c, ts, _ = base  # the original settings still resume from the newest step
    ck = Checkpointer(tmp_path, c.checkpoint, settings=train_settings(c))
    _, step = ck.restore(ts.abstract_state, None)
    ck.close()
    assert step == 6


def test_changed_structure_without_recorded_settings_is_an_error(base, tmp_path):
    save_steps(tmp_path, base, settings=False)
    c2 = run_config(accum=2)
    ts2, _ = train_step(c2)
    ck = Checkpointer(tmp_path, c2.checkpoint)
    with pytest.raises(SettingsMismatch, match="does not fit the current configuration"):
        ck.restore(ts2.abstract_state, None)
    ck.close()
    assert step_dirs(tmp_path) == ["3", "6"]


def test_bit_flip_is_detected_quarantined_and_never_deleted(base, tmp_path, caplog):
    c, ts, state = base
    save_steps(tmp_path, base)
    assert (tmp_path / "checkpoints" / "6" / integrity.CHECKSUMS).is_file()
    flip_bytes(tmp_path / "checkpoints" / "6")
    ck = Checkpointer(tmp_path, c.checkpoint, settings=train_settings(c))
    with caplog.at_level(logging.WARNING):
        restored, step = ck.restore(ts.abstract_state, None)
    ck.close()
    assert step == 3 and "sha256 mismatch" in caplog.text
    np.testing.assert_array_equal(
        np.asarray(restored["params"]["embedding"]), np.asarray(state["params"]["embedding"]) + 3
    )
    assert (tmp_path / "corrupt_checkpoints" / "6" / "params").is_dir()
    # the same step corrupted again: the earlier quarantined copy is kept, the new one goes beside it
    save_steps(tmp_path, base, steps=(6,))
    flip_bytes(tmp_path / "checkpoints" / "6")
    ck = Checkpointer(tmp_path, c.checkpoint, settings=train_settings(c))
    assert ck.restore(ts.abstract_state, None)[1] == 3
    ck.close()
    assert sorted(p.name for p in (tmp_path / "corrupt_checkpoints").iterdir()) == ["6", "6.1"]


def test_only_step_corrupt_is_an_error_and_stays_in_place(base, tmp_path):
    c, ts, _ = base
    save_steps(tmp_path, base, steps=(3,))
    f = max(
        (p for p in (tmp_path / "checkpoints" / "3" / "params").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    f.write_bytes(f.read_bytes()[:37])  # truncated
    ck = Checkpointer(tmp_path, c.checkpoint, settings=train_settings(c))
    with pytest.raises(CorruptCheckpoint, match="truncated") as e:
        ck.restore(ts.abstract_state, None)
    ck.close()
    assert len(str(e.value)) < 600  # a short message, not a tensorstore spec
    assert step_dirs(tmp_path) == ["3"]


def test_model_checkpoint_checksums_and_load_any_fallback(base, tmp_path, caplog):
    c, ts, state = base
    model = ts.model(state)
    out = orbax_io.save_model(model, tmp_path / "m")
    assert (out / integrity.CHECKSUMS).is_file()
    orbax_io.load_model(out)
    flip_bytes(out)
    with pytest.raises(integrity.IntegrityError, match="sha256 mismatch"):
        orbax_io.load_model(out)
    # a workdir whose latest step is broken: load_any falls back to the previous complete step
    w = tmp_path / "w"
    save_steps(w, base)
    flip_bytes(w / "checkpoints" / "6")
    with caplog.at_level(logging.WARNING):
        _, m = orbax_io.load_any(w)
    assert "falling back" in caplog.text
    np.testing.assert_array_equal(
        np.asarray(orbax_io.param_tree(m)["embedding"]), np.asarray(state["params"]["embedding"]) + 3
    )
    # a path to a file inside a checkpoint means its directory
    _, m2 = orbax_io.load_any(w / "checkpoints" / "3" / "kalm_model" / "kalm_model.json")
    assert m2.config == m.config


def test_torn_metrics_line_does_not_break_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=2)
    w.write(3, {"loss": 0.8})
    w.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        MetricsWriter(tmp_path, tensorboard=False, resume_step=2)


def test_truncated_params_without_checksums_give_a_short_message(base, tmp_path):
    c, ts, state = base
    out = orbax_io.save_model(ts.model(state), tmp_path / "m")
    (out / integrity.CHECKSUMS).unlink()  # an older checkpoint: nothing to verify against
    for f in (out / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:37])
    with pytest.raises(orbax_io.CheckpointError, match="cannot restore the parameters") as e:
        orbax_io.load_model(out)
    assert len(str(e.value)) < 800
    (out / orbax_io.META_FILE).write_text('{"format": ')
    with pytest.raises(orbax_io.CheckpointError, match="kalm_model.json: not valid JSON"):
        orbax_io.load_model(out)


# ---------------------------------------------------------------------- tokenizer and data-iterator settings
def test_changed_data_iterator_setting_is_named_and_the_mesh_is_not_a_setting(base, tmp_path):
    """Resuming with another data.batch_size names it (before: "a setting that changes the parameter or optimiser
    state differs" without the key); a checkpoint recorded before these keys existed still resumes."""
    save_steps(tmp_path, base)
    c, ts, _ = base
    c2 = run_config()
    c2.data.batch_size = 16
    ck = Checkpointer(tmp_path, c2.checkpoint, settings=train_settings(c2))
    with pytest.raises(SettingsMismatch, match=r"data\.batch_size: checkpoint 8, now 16"):
        ck.restore(ts.abstract_state, None)
    ck.close()
    c3 = run_config()
    c3.data.group_size, c3.seed, c3.data.train_jsonl = 4, 7, ("a.jsonl",)
    ck = Checkpointer(tmp_path, c3.checkpoint, settings=train_settings(c3))
    with pytest.raises(SettingsMismatch) as e:
        ck.restore(ts.abstract_state, None)
    ck.close()
    for needle in (
        "data.group_size: checkpoint 2, now 4",
        "seed: checkpoint 0, now 7",
        "data.train_jsonl: checkpoint '<unset>', now [",
        "data.dataset: checkpoint 'scifact', now '<unset>'",
    ):
        assert needle in str(e.value)
    other_mesh = run_config()
    other_mesh.mesh.data, other_mesh.mesh.fsdp, other_mesh.mesh.tensor = 2, 2, 2
    assert train_settings(other_mesh) == train_settings(c)
    old = tmp_path / "old"  # written before tokenizer/data settings were recorded
    legacy = {k: v for k, v in train_settings(c).items() if not k.startswith(("tokenizer", "seed", "data."))}
    ck = Checkpointer(old, c.checkpoint, settings=legacy)
    st = dict(base[2], step=jnp.asarray(3, jnp.int32))
    assert ck.save(st, orbax_io.model_meta(ts.model(st)), None, force=True)
    ck.close()
    ck = Checkpointer(old, c.checkpoint, settings=train_settings(c, "f" * 64))
    assert ck.restore(ts.abstract_state, None)[1] == 3
    ck.close()


def test_other_tokenizer_on_resume_is_refused_and_the_workdirs_is_kept(base, tokenizer, scifact_texts, tmp_path):
    """`--config.tokenizer=OTHER` on a workdir trained with another tokenizer: `SettingsMismatch` naming
    `tokenizer`, and the workdir's tokenizer file is never overwritten (before: replaced, training went on)."""
    import shutil

    from kalm_jax.text.spm import Tokenizer
    from kalm_jax.training.loop import run_tokenizer

    other = Tokenizer.train(scifact_texts[:400], tmp_path / "other", vocab_size=1000)
    assert other.fingerprint() != tokenizer.fingerprint()
    w = tmp_path / "w"
    w.mkdir()
    shutil.copyfile(tokenizer.path, w / "tokenizer.model")
    before = (w / "tokenizer.model").read_bytes()
    c = run_config()
    c.tokenizer = str(other.path)
    with pytest.raises(
        SettingsMismatch,
        match=r"tokenizer: --config.tokenizer=.* is not the tokenizer this workdir "
        r"was trained with",
    ):
        run_tokenizer(c, w, [])
    assert (w / "tokenizer.model").read_bytes() == before
    assert sorted(p.name for p in w.iterdir()) == ["tokenizer.model"]
    c.tokenizer = str(tokenizer.path)  # the same content is fine
    assert run_tokenizer(c, w, []).fingerprint() == tokenizer.fingerprint()

    _, ts, _ = base  # the checkpoints record the fingerprint too (e.g. a workdir whose file was replaced by hand)
    c0 = run_config()
    w2 = tmp_path / "w2"
    ck = Checkpointer(w2, c0.checkpoint, settings=train_settings(c0, tokenizer.fingerprint()))
    st = dict(base[2], step=jnp.asarray(3, jnp.int32))
    assert ck.save(st, orbax_io.model_meta(ts.model(st)), None, force=True)
    ck.close()
    ck = Checkpointer(w2, c0.checkpoint, settings=train_settings(c0, other.fingerprint()))
    with pytest.raises(
        SettingsMismatch, match=f"tokenizer: checkpoint '{tokenizer.fingerprint()}', now '{other.fingerprint()}'"
    ):
        ck.restore(ts.abstract_state, None)
    ck.close()
