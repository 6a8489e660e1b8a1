"""Passage states and the store validate their files: manifests, dtypes, scale only for int8, ratios, finite
states, ids, shard names (no paths leaving the store), duplicate shards; derived shards follow their source."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from kalm_jax.evaluation.store import PassageStore, StoreKey
from kalm_jax.inference.states import PassageStates, PassageStatesError
from kalm_jax.model import mep


def states(n=3, c=8, h=4, seed=0, ids=True) -> PassageStates:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, c + 1, n)
    mask = (np.arange(c)[None] < lengths[:, None]).astype(np.int8)
    st = rng.normal(size=(n, c, h)).astype(np.float32) * mask[..., None]
    return PassageStates(st, mask, mask.astype(np.int32), 1, [f"d{seed}-{i}" for i in range(n)] if ids else None)


def edit_manifest(d, **changes):
    m = json.loads((d / "manifest.json").read_text())
    m.update(changes)
    (d / "manifest.json").write_text(json.dumps(m))


def test_stray_scale_for_float_states_is_refused(tmp_path):
    d = states().save(tmp_path / "s")
    np.save(d / "scale.npy", np.full((3, 8), 100.0, np.float32))
    with pytest.raises(PassageStatesError, match="stray scale.npy"):
        PassageStates.load(d)
    q = states().to_storage("int8").save(tmp_path / "q")
    (q / "scale.npy").unlink()
    with pytest.raises(PassageStatesError, match="no scale.npy"):
        PassageStates.load(q)


@pytest.mark.parametrize("ratio", [-4, 0, 2.5, "4", True])
def test_bad_manifest_ratio_is_refused(tmp_path, ratio):
    d = states().save(tmp_path / "s")
    edit_manifest(d, ratio=ratio)
    with pytest.raises(PassageStatesError, match="ratio must be an integer >= 1"):
        PassageStates.load(d)


def test_non_finite_states_are_refused_when_read(tmp_path):
    s = states()
    s.states[1, 0, 2] = np.nan
    d = s.save(tmp_path / "s")
    loaded = PassageStates.load(d)  # memory-mapped: nothing read yet
    loaded.select([0])
    with pytest.raises(PassageStatesError, match="non-finite"):
        loaded.select([0, 1])
    with pytest.raises(PassageStatesError, match="non-finite"):
        PassageStates.load(d, mmap=False)
    with pytest.raises(PassageStatesError, match="non-finite"):
        loaded.to_ratio(2)


@pytest.mark.parametrize(
    "ids,needle",
    [
        ("d0-0", "list of strings"),
        (["a", "a", "b"], "duplicate passage id 'a'"),
        ([1, 2, 3], "non-string"),
        (["a"], "1 ids for 3 passages"),
    ],
)
def test_bad_ids_are_refused(tmp_path, ids, needle):
    d = states().save(tmp_path / "s")
    (d / "ids.json").write_text(json.dumps(ids))
    with pytest.raises(PassageStatesError, match=needle):
        PassageStates.load(d)


def test_broken_json_and_wrong_hidden_size_are_named(tmp_path):
    d = states().save(tmp_path / "s")
    with pytest.raises(PassageStatesError, match="hidden size 4, the model's is 64"):
        PassageStates.load(d, hidden_size=64)
    (d / "ids.json").write_text('["d0-0", ')
    with pytest.raises(PassageStatesError, match=r"ids.json: the passage ids is not valid JSON"):
        PassageStates.load(d)
    (d / "manifest.json").write_text("{")
    with pytest.raises(PassageStatesError, match=r"manifest.json: the manifest is not valid JSON"):
        PassageStates.load(d)
    e = states().save(tmp_path / "e")
    np.save(e / "counts.npy", np.full((3, 8), 5, np.int32))
    with pytest.raises(PassageStatesError, match="counts.npy"):
        PassageStates.load(e)


KEY = StoreKey("model", "tok", 32, 1)


def make_store(root):
    st = PassageStore.open(root, KEY)
    st._add_shard(states(seed=0))
    st._add_shard(states(seed=1))
    return st


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/../../b", ""])
def test_store_manifest_shard_paths_leaving_the_store_are_refused(tmp_path, name):
    make_store(tmp_path / "store")
    m = json.loads((tmp_path / "store" / "manifest.json").read_text())
    m["shards"][1]["name"] = name
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PassageStatesError, match="plain directory names"):
        PassageStore.open(tmp_path / "store", KEY)


def test_store_shard_listed_twice_or_shared_ids_are_refused(tmp_path):
    make_store(tmp_path / "store")
    path = tmp_path / "store" / "manifest.json"
    m = json.loads(path.read_text())
    m["shards"].append(m["shards"][0])
    path.write_text(json.dumps(m))
    with pytest.raises(PassageStatesError, match="listed twice"):
        PassageStore.open(tmp_path / "store", KEY)
    st = make_store(tmp_path / "store2")
    (st.root / "r1" / "shard-00001" / "ids.json").write_text(json.dumps(["d0-0", "x", "y"]))
    with pytest.raises(PassageStatesError, match="also in shard shard-00000"):
        _ = PassageStore.open(st.root, KEY).index


def test_derived_shard_follows_its_source(tmp_path, caplog):
    st = make_store(tmp_path / "store")
    first = st.lookup(["d0-1"], 4)
    want = mep.repool(states(seed=0).dense()[1:2], states(seed=0).counts[1:2], 4)[0]
    np.testing.assert_allclose(first.dense()[0, : want.shape[1]], np.asarray(want)[0], rtol=1e-6)
    # the ratio-1 shard is replaced (e.g. re-encoded): the ratio-4 shard derived from it must not be served
    changed = states(seed=0)
    changed.states[:] *= 2
    changed.meta = {**KEY.as_dict(), "shard": "shard-00000"}
    changed.save(st.root / "r1" / "shard-00000", overwrite=True)
    with caplog.at_level(logging.WARNING):
        again = PassageStore.open(st.root, KEY).lookup(["d0-1"], 4)
    assert "deriving it again" in caplog.text
    np.testing.assert_allclose(again.dense(), 2 * first.dense(), rtol=1e-6)


def test_disk_full_while_saving_states_names_the_directory_and_keeps_nothing(tmp_path, monkeypatch):
    from kalm_jax.atomic import DiskFullError

    states = PassageStates(
        np.ones((2, 3, 4), np.float32), np.ones((2, 3), np.int8), np.ones((2, 3), np.int32), 4, ["a", "b"]
    )

    def short_write(*args, **kwargs):
        raise OSError("8192 requested and 1092 written")  # numpy's message for a short write on a full disk

    monkeypatch.setattr(np, "save", short_write)
    with pytest.raises(DiskFullError, match=r"states: the disk is full \(writing stopped: 8192 requested"):
        states.save(tmp_path / "states")
    assert not (tmp_path / "states").exists() and list(tmp_path.iterdir()) == []


def test_store_lock_waits_then_names_its_holder(tmp_path, caplog):
    """A second writer of a store waits for its lock with a logged message, then fails naming the holder."""
    import subprocess
    import sys
    import time

    from kalm_jax.evaluation.store import StoreLocked, lock_path

    root = tmp_path / "store"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from kalm_jax.locks import file_lock\n"
                "with file_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)"
            ),
            str(lock_path(root)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with caplog.at_level(logging.INFO), pytest.raises(StoreLocked, match=f"pid {holder.pid} on "):
            PassageStore.open(root, KEY, lock_timeout=1.5)
        assert time.perf_counter() - t0 >= 1.5
        assert "waiting up to 1.5 s" in caplog.text and f"pid {holder.pid}" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    make_store(root)  # the kernel released the killed holder's lock
    assert len(PassageStore.open(root, KEY, lock_timeout=0)) == 6


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last value (the .npy header stays valid)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["states.npy", "ids.json"])
def test_a_flipped_bit_is_a_named_integrity_error(tmp_path, name):
    """A saved file that changed after it was written loads with an IntegrityError naming it, not silently."""
    from kalm_jax.checkpoints.integrity import IntegrityError

    d = states().save(tmp_path / "s")
    PassageStates.load(d)
    if name == "ids.json":  # still a valid id list, but of other passages
        (d / name).write_text((d / name).read_text().replace("d0-1", "d0-7"))
    else:
        flip_last_byte(d / name)
    with pytest.raises(IntegrityError, match=f"{d / name}: contents changed since it was written"):
        PassageStates.load(d)
    with pytest.raises(IntegrityError, match=name):
        PassageStates.load(d, mmap=False)


def test_a_flipped_bit_in_a_store_shard_is_named_and_older_directories_use_the_content_hash(tmp_path):
    from kalm_jax.checkpoints.integrity import IntegrityError

    st = make_store(tmp_path / "store")
    path = st.root / "r1" / "shard-00001" / "states.npy"
    flip_last_byte(path)
    with pytest.raises(IntegrityError, match=f"{path}: contents changed"):
        PassageStore.open(st.root, KEY).lookup(["d1-0"], 1)
    with pytest.raises(IntegrityError, match=f"{path}: contents changed"):
        PassageStore.open(st.root, KEY).lookup(["d0-0"], 4)  # any ratio reads the shards it is derived from
    # a directory saved before per-file hashes were recorded is checked against its content hash
    d = states().save(tmp_path / "old")
    m = json.loads((d / "manifest.json").read_text())
    del m["files"]
    (d / "manifest.json").write_text(json.dumps(m))
    PassageStates.load(d)
    flip_last_byte(d / "states.npy")
    with pytest.raises(IntegrityError, match="content sha256 mismatch"):
        PassageStates.load(d)
