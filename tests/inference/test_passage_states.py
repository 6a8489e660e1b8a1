"""PassageStates: storage round trips, exact repool, selection, stale-cache detection."""

from __future__ import annotations

import numpy as np
import pytest

from kalm_jax.inference.states import PassageStates
from kalm_jax.model import mep


def _states(r=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 29, 16)).astype(np.float32)
    mask = (np.arange(29)[None] < rng.integers(1, 30, 6)[:, None]).astype(np.int32)
    pooled, pmask, counts = mep.pool(x, mask, r)
    return (
        x,
        mask,
        PassageStates(
            np.asarray(pooled),
            np.asarray(pmask),
            np.asarray(counts),
            r,
            ids=[f"d{i}" for i in range(6)],
            meta={"model": "abc"},
        ),
    )


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_save_load_round_trip(tmp_path, storage):
    _, _, ps = _states()
    ps = ps.to_storage(storage)
    back = PassageStates.load(ps.save(tmp_path / storage))
    assert back.storage == storage and back.ids == ps.ids and back.ratio == 2
    np.testing.assert_array_equal(back.dense(), ps.dense())
    tol = {"float32": 0, "bfloat16": 1e-2, "int8": 2e-2}[storage]
    ref = ps.to_storage("float32").dense() if storage == "float32" else _states()[2].dense()
    np.testing.assert_allclose(back.dense(), ref, atol=tol * np.abs(ref).max() + 1e-7)


def test_repool_matches_direct_pooling():
    x, mask, ps = _states(r=2)
    coarse = ps.repool(4)
    direct = mep.pool(x, mask, 8)
    assert coarse.ratio == 8
    np.testing.assert_allclose(coarse.dense(), np.asarray(direct[0]), atol=1e-5)
    np.testing.assert_array_equal(coarse.counts, np.asarray(direct[2]))
    assert ps.to_ratio(8).ratio == 8
    with pytest.raises(ValueError, match="multiple of 2"):
        ps.to_ratio(3)


def test_select_and_concatenate():
    _, _, ps = _states()
    sub = ps.select([3, 1])
    assert sub.ids == ["d3", "d1"]
    np.testing.assert_array_equal(sub.dense()[0], ps.dense()[3, : sub.mask.shape[1]])
    assert not ps.mask[[3, 1], sub.mask.shape[1] :].any()
    both = PassageStates.concatenate([ps.select([0]), ps.select([1, 2])])
    assert len(both) == 3 and both.ids == ["d0", "d1", "d2"]


def test_select_refuses_float_and_boolean_indices():
    # A boolean array was read as rows 0/1 and [1.7] as row 1: both are named errors (no mask semantics).
    _, _, ps = _states()
    for rows in ([1.7], np.array([0.0, 2.0]), np.array([1.5], np.float32)):
        with pytest.raises(TypeError, match=r"rows: row indices must be integers, got float"):
            ps.select(rows)
    for rows in (np.array([True, False, True, False, False, True]), [True, False], np.bool_(True)):
        with pytest.raises(TypeError, match=r"rows: boolean indices are refused .*np.flatnonzero"):
            ps.select(rows)
    with pytest.raises(TypeError, match="row indices must be integers, got <U"):
        ps.select(["d1"])
    assert ps.select(np.array([2, 0], np.uint32)).ids == ["d2", "d0"]
    assert ps.select([]).ids == [] and len(ps.select(np.array([], np.int64))) == 0


def test_stale_meta_is_an_error(tmp_path):
    _, _, ps = _states()
    path = ps.save(tmp_path / "s")
    assert PassageStates.load(path, expect_meta={"model": "abc"}).ids == ps.ids
    with pytest.raises(ValueError, match="model: stored 'abc' vs expected 'xyz'"):
        PassageStates.load(path, expect_meta={"model": "xyz"})
    with pytest.raises(FileExistsError):
        ps.save(path)
