"""Cached passage states: pooled encoder states + masks + window counts, with exact re-pooling and storage.

On disk a `PassageStates` is a directory:
  `manifest.json`  {"format": "kalm-jax-passage-states", "version": 1, "ratio", "storage", "shape",
                    "ids_file", "meta": {...fingerprints, max_length, ...}}
  `states.npy` [P, C, H] (float32, bfloat16 stored as uint16 bits, or int8), `scale.npy` [P, C] (int8 only),
  `mask.npy` [P, C] int8, `counts.npy` [P, C] int32, `ids.json` (optional passage ids).
Files are memory-mapped on load, so a large store is not read into memory until rows are selected.

`load` validates what it reads: the manifest's fields (format, storage, ratio an integer >= 1, shape),
each file's dtype and shape, `scale.npy` present exactly for int8, mask 0/1 and counts in [0, ratio],
`ids.json` a list of unique strings, the hidden size when the caller knows it. Non-finite states are
refused when rows are read (`select`, `dense`), so a memory-mapped store is not read whole at load.
`manifest.json` also records `content`: a sha256 of the arrays, so states derived from these can tell
when their source changed, and `files`: the sha256 of each file beside it, verified by every `load` (a flipped
bit raises `integrity.IntegrityError` naming the file; directories saved before `files` existed are checked
against `content`). Hashing reads each file once: about 1 s per GiB on one core (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from kalm_jax.atomic import atomic_directory
from kalm_jax.checkpoints import integrity
from kalm_jax.model import mep
from kalm_jax.model.t5gemma2 import dequantize_passages

FORMAT = "kalm-jax-passage-states"
STORAGE = ("float32", "bfloat16", "int8")
_FILE_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "int8": np.int8}


def row_indices(rows, what: str) -> np.ndarray:
    """`rows` as an int64 array of row numbers. Floats ([1.7] was row 1) and booleans (a mask was rows 0/1)
    are a TypeError naming `what`; an empty list is no rows."""
    a = np.asarray(rows)
    if a.dtype == np.bool_:
        raise TypeError(
            f"{what}: boolean indices are refused (they would be read as rows 0 and 1); pass row "
            f"numbers, e.g. np.flatnonzero(mask)"
        )
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what}: row indices must be integers, got {a.dtype} (e.g. {a.reshape(-1)[0]!r})")
    return a.astype(np.int64)


class PassageStatesError(ValueError):
    """A passage-state directory whose files are missing, inconsistent or hold invalid values."""


def quantize_int8(dense, xp=np):
    """The one int8 quantizer of passage states: symmetric per-window absmax.

    dense [..., C, H] float32 -> (values [..., C, H] int8, scale [..., C] float32) with
    ``values * scale[..., None]`` ~= dense (`t5gemma2.dequantize_passages` inverts it). `xp` is the array
    module: numpy on the host (`PassageStates.to_storage("int8")`, the engine's host batches) or jax.numpy
    inside a jitted program (the engine re-quantizes windows re-pooled on the device); both compute the same
    fp32 operations in the same order."""
    dense = xp.asarray(dense, xp.float32)
    # x (1/127 in fp32), not / 127: XLA rewrites a division by a constant into this product, numpy does not
    scale = xp.maximum(xp.abs(dense).max(axis=-1), xp.float32(1e-12)).astype(xp.float32) * xp.float32(1 / 127)
    values = xp.clip(xp.rint(dense / scale[..., None]), -127, 127).astype(xp.int8)
    return values, scale


def _finite(a: np.ndarray, where: str) -> np.ndarray:
    if a.dtype != np.int8 and a.size and not np.isfinite(np.asarray(a, np.float32)).all():
        raise PassageStatesError(f"{where}: holds non-finite values (NaN/inf); re-encode these passages")
    return a


def read_json(path: Path, what: str):
    """Parsed JSON of `path`; PassageStatesError naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise PassageStatesError(f"{path}: {what} is not valid JSON ({type(e).__name__}: {e})") from None


def check_ids(ids, where: str, count: int | None = None) -> list[str]:
    """`ids` if it is a list of unique strings (of length `count`); PassageStatesError otherwise."""
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise PassageStatesError(
            f"{where}: ids must be a JSON list of strings, got {type(ids).__name__}"
            + ("" if not isinstance(ids, list) else " with non-string entries")
        )
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PassageStatesError(f"{where}: duplicate passage id {dup!r}")
    if count is not None and len(ids) != count:
        raise PassageStatesError(f"{where}: {len(ids)} ids for {count} passages")
    return ids


@dataclasses.dataclass
class PassageStates:
    """Pooled states of P passages at ratio `ratio`.

    states: [P, C, H] float32 / bfloat16 / int8 (int8 rows are dequantised with `scale` [P, C]).
    mask: [P, C] 0/1 (window holds at least one token). counts: [P, C] valid tokens per window.
    """

    states: np.ndarray
    mask: np.ndarray
    counts: np.ndarray
    ratio: int
    ids: list[str] | None = None
    scale: np.ndarray | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.states.ndim != 3 or self.mask.shape != self.states.shape[:2] or self.counts.shape != self.mask.shape:
            raise ValueError(
                f"inconsistent shapes: states {self.states.shape}, mask {self.mask.shape}, counts {self.counts.shape}"
            )
        if self.ids is not None and len(self.ids) != len(self.states):
            raise ValueError(f"{len(self.ids)} ids for {len(self.states)} passages")

    def __len__(self) -> int:
        return int(self.states.shape[0])

    @property
    def storage(self) -> str:
        if self.states.dtype == np.int8:
            return "int8"
        return "bfloat16" if self.states.dtype == ml_dtypes.bfloat16 else "float32"

    @property
    def bytes_per_passage(self) -> float:
        """Mean stored bytes per passage for the windows it actually uses (states + mask + counts)."""
        item = self.states.dtype.itemsize * self.states.shape[2] + (4 if self.scale is not None else 0) + 5
        return float(self.mask.sum()) * item / max(1, len(self))

    def dense(self, dtype=np.float32) -> np.ndarray:
        """States as a float array [P, C, H] (dequantised when stored as int8)."""
        where = str(self.meta.get("path", "passage states"))
        if self.scale is not None:
            return _finite(dequantize_passages(self.states, self.scale, dtype, xp=np), where)
        return _finite(np.asarray(self.states).astype(dtype), where)

    def select(self, rows: Sequence[int] | np.ndarray, *, trim: bool = True) -> PassageStates:
        """Rows `rows` (in that order); with `trim`, windows beyond the longest selected passage are dropped.

        `rows` are integer row numbers; float or boolean arrays are a TypeError (`row_indices`): select a
        boolean mask's rows with ``select(np.flatnonzero(mask))``."""
        rows = row_indices(rows, "rows")
        mask = np.asarray(self.mask[rows])
        width = int(mask.sum(axis=0).nonzero()[0].max()) + 1 if trim and mask.any() else mask.shape[1]
        states = np.asarray(self.states[rows, :width])
        if self.meta.get("path"):  # read from disk: refuse NaN/inf rows as they are read
            _finite(states, f"{self.meta['path']}/states.npy")
        return PassageStates(
            states=states,
            mask=mask[:, :width],
            counts=np.asarray(self.counts[rows, :width]),
            ratio=self.ratio,
            ids=[self.ids[i] for i in rows] if self.ids is not None else None,
            scale=np.asarray(self.scale[rows, :width]) if self.scale is not None else None,
            meta=dict(self.meta),
        )

    def repool(self, factor: int) -> PassageStates:
        """Count-weighted re-pooling to ratio `factor`·ratio, returned in the same storage dtype.

        What it guarantees: the result is the exact count-weighted mean, computed in fp32, of the *stored*
        windows (dequantised). With float32 storage that equals pooling the encoder states at the coarser
        ratio directly (up to fp32 summation order, ~1e-6 relative). With bfloat16 / int8 storage the finer
        windows were already rounded when stored, so the result differs from direct pooling by at most that
        rounding (bf16: 2^-8 relative per element; int8: half a quantisation step of the window's scale), plus
        one more rounding to the storage dtype here. The inference engine's scoring path re-pools on the device
        and keeps the fp32 result (no second rounding); store float32 states when bit-level agreement with
        direct encoding at every ratio matters.
        """
        factor = mep.check_ratio(factor)
        pooled, pmask, counts = mep.repool(self.dense(np.float32), self.counts, factor)
        out = PassageStates(
            np.asarray(pooled),
            np.asarray(pmask, np.int8),
            np.asarray(counts, np.int32),
            self.ratio * factor,
            self.ids,
            meta=dict(self.meta),
        )
        return out.to_storage(self.storage)

    def to_ratio(self, ratio: int) -> PassageStates:
        """These states at `ratio`, which must be a multiple of the stored ratio."""
        if ratio % self.ratio:
            raise ValueError(
                f"cannot derive ratio {ratio} from states pooled at ratio {self.ratio}: "
                f"it must be a multiple of {self.ratio}"
            )
        return self if ratio == self.ratio else self.repool(ratio // self.ratio)

    def to_storage(self, storage: str) -> PassageStates:
        """Converts to float32, bfloat16 or int8 (symmetric per-window absmax quantisation)."""
        if storage not in STORAGE:
            raise ValueError(f"unknown storage {storage!r}; choose from {STORAGE}")
        if storage == self.storage:
            return self
        dense = self.dense(np.float32)
        scale = None
        if storage == "int8":
            states, scale = quantize_int8(dense)
        elif storage == "bfloat16":
            states = dense.astype(ml_dtypes.bfloat16)
        else:
            states = dense
        return dataclasses.replace(self, states=states, scale=scale)

    @classmethod
    def concatenate(cls, parts: Sequence[PassageStates]) -> PassageStates:
        """Stacks passages of several batches, padding windows to the widest."""
        if not parts:
            raise ValueError("nothing to concatenate")
        ratios = {p.ratio for p in parts}
        storages = {p.storage for p in parts}
        if len(ratios) > 1 or len(storages) > 1:
            raise ValueError(f"cannot concatenate states of ratios {ratios} / storages {storages}")
        width = max(p.mask.shape[1] for p in parts)

        def pad(a):
            return np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2))

        ids = None if any(p.ids is None for p in parts) else [i for p in parts for i in p.ids]
        scale = None if parts[0].scale is None else np.concatenate([pad(p.scale) for p in parts])
        return cls(
            np.concatenate([pad(np.asarray(p.states)) for p in parts]),
            np.concatenate([pad(np.asarray(p.mask)) for p in parts]),
            np.concatenate([pad(np.asarray(p.counts)) for p in parts]),
            parts[0].ratio,
            ids,
            scale,
            dict(parts[0].meta),
        )

    # ------------------------------------------------------------------ disk
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Writes the directory atomically (temporary directory, then rename)."""
        out = Path(directory).absolute()
        with atomic_directory(out, overwrite=overwrite) as tmp:
            states = self.states.view(np.uint16) if self.storage == "bfloat16" else self.states
            np.save(tmp / "states.npy", np.ascontiguousarray(states))
            np.save(tmp / "mask.npy", np.asarray(self.mask, np.int8))
            np.save(tmp / "counts.npy", np.asarray(self.counts, np.int32))
            if self.scale is not None:
                np.save(tmp / "scale.npy", np.asarray(self.scale, np.float32))
            if self.ids is not None:
                (tmp / "ids.json").write_text(json.dumps(list(self.ids)))
            meta = {k: v for k, v in self.meta.items() if k != "path"}
            files = {f.name: integrity.file_sha256(f) for f in sorted(tmp.iterdir())}
            manifest = {
                "format": FORMAT,
                "version": 1,
                "ratio": self.ratio,
                "storage": self.storage,
                "shape": list(self.states.shape),
                "has_ids": self.ids is not None,
                "meta": meta,
                "content": self.content_hash(),
                "files": files,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return out

    def content_hash(self) -> str:
        """sha256 of the arrays (states, mask, counts, scale): identifies exactly these states."""
        h = hashlib.sha256(f"{self.ratio}|{self.storage}|{self.states.shape}".encode())
        for a in (self.states, self.mask, self.counts, self.scale):
            if a is not None:
                h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
        return h.hexdigest()

    @staticmethod
    def stored_content(directory: str | os.PathLike) -> str | None:
        """The `content` hash recorded in a saved directory's manifest (None if absent or unreadable)."""
        path = Path(directory) / "manifest.json"
        try:
            value = json.loads(path.read_text()).get("content")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        expect_meta: dict[str, Any] | None = None,
        mmap: bool = True,
        hidden_size: int | None = None,
        verify: bool = True,
    ) -> PassageStates:
        """Reads and validates a directory written by `save` (see the module docstring for the checks).

        expect_meta: entries (e.g. model/tokenizer fingerprints, max_length) that must equal the stored
        meta; a mismatch raises ValueError naming the differing keys (a stale cache is never reused).
        hidden_size: the model's hidden size, when known; states of another width are refused.
        verify: check every file against the sha256 recorded in the manifest (reads each file once); a
        mismatch raises `integrity.IntegrityError` naming the file. Only callers that merely read the
        manifest's fields pass False.
        Raises PassageStatesError naming the file for anything invalid.
        """
        from kalm_jax.atomic import recover

        d = Path(directory)
        recover(d)
        manifest_path = d / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{d}: no manifest.json (not a passage-state directory)")
        manifest = read_json(manifest_path, "the manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise PassageStatesError(f"{manifest_path}: format {found!r}, expected {FORMAT!r}")
        storage, ratio, shape = manifest.get("storage"), manifest.get("ratio"), manifest.get("shape")
        if storage not in STORAGE:
            raise PassageStatesError(f"{manifest_path}: storage {storage!r}, expected one of {STORAGE}")
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
            raise PassageStatesError(f"{manifest_path}: ratio must be an integer >= 1, got {ratio!r}")
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)
        ):
            raise PassageStatesError(f"{manifest_path}: shape must be [passages, windows, hidden], got {shape!r}")
        if hidden_size is not None and shape[2] != hidden_size:
            raise PassageStatesError(
                f"{d}: states have hidden size {shape[2]}, the model's is {hidden_size}; they "
                "were encoded by another model"
            )
        meta = manifest.get("meta", {})
        if not isinstance(meta, dict):
            raise PassageStatesError(f"{manifest_path}: meta must be an object, got {type(meta).__name__}")
        if expect_meta:
            diff = {k: (meta.get(k), v) for k, v in expect_meta.items() if meta.get(k) != v}
            if diff:
                details = ", ".join(f"{k}: stored {a!r} vs expected {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"{d}: passage states were written for a different setting ({details})")
        mode = "r" if mmap else None

        def array(name: str, dtype, want: tuple[int, ...]) -> np.ndarray:
            path = d / name
            if not path.is_file():
                raise PassageStatesError(f"{path}: missing")
            try:
                a = np.load(path, mmap_mode=mode, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise PassageStatesError(f"{path}: not a readable .npy file ({e})") from None
            if a.dtype != np.dtype(dtype) or a.shape != want:
                raise PassageStatesError(
                    f"{path}: {a.dtype} {a.shape}, expected {np.dtype(dtype)} {want} "
                    f"(storage {storage}, manifest shape {shape})"
                )
            return a

        p, c, _ = shape
        states = array("states.npy", _FILE_DTYPES[storage], tuple(shape))
        if storage == "bfloat16":
            states = states.view(ml_dtypes.bfloat16)
        has_scale = (d / "scale.npy").exists()
        if has_scale != (storage == "int8"):
            raise PassageStatesError(
                f"{d}: {'a stray scale.npy with' if has_scale else 'no scale.npy for'} "
                f"{storage} states (scale.npy belongs to int8 storage only)"
            )
        scale = _finite(array("scale.npy", np.float32, (p, c)), f"{d}/scale.npy") if has_scale else None
        if scale is not None and (np.asarray(scale) < 0).any():
            raise PassageStatesError(f"{d}/scale.npy: negative scales")
        mask = array("mask.npy", np.int8, (p, c))
        counts = array("counts.npy", np.int32, (p, c))
        if not np.isin(np.asarray(mask), (0, 1)).all():
            raise PassageStatesError(f"{d}/mask.npy: values other than 0/1")
        cn = np.asarray(counts)
        if cn.size and (cn.min() < 0 or cn.max() > ratio or ((cn > 0) != (np.asarray(mask) > 0)).any()):
            raise PassageStatesError(
                f"{d}/counts.npy: window counts must be in [0, ratio={ratio}] and > 0 exactly where mask.npy is 1"
            )
        ids = None
        if manifest.get("has_ids"):
            ids = check_ids(read_json(d / "ids.json", "the passage ids"), f"{d}/ids.json", p)
        if not mmap:
            _finite(np.asarray(states, np.float32) if storage == "bfloat16" else states, f"{d}/states.npy")
        out = cls(states, mask, counts, ratio, ids, scale, {**meta, "path": str(d)})
        if verify:
            _verify(d, manifest, out)
        return out


def _verify(d: Path, manifest: dict[str, Any], states: PassageStates) -> None:
    """Every file against its recorded sha256 (`files`); directories saved before `files` was recorded:
    the arrays against `content`. Raises `integrity.IntegrityError` naming the file (or the arrays)."""
    files = manifest.get("files")
    if isinstance(files, dict) and files:
        for name, want in sorted(files.items()):
            path = d / str(name)
            if not isinstance(name, str) or "/" in name or name in (".", ".."):
                raise integrity.IntegrityError(f"{d}/manifest.json: files lists {name!r}, not a file of the directory")
            if not path.is_file():
                raise integrity.IntegrityError(f"{path}: missing (listed in {d}/manifest.json)")
            if integrity.file_sha256(path) != want:
                raise integrity.IntegrityError(
                    f"{path}: contents changed since it was written (sha256 mismatch with "
                    f"{d}/manifest.json): the file is corrupt; delete {d} to re-encode"
                )
    elif isinstance(manifest.get("content"), str) and states.content_hash() != manifest["content"]:
        raise integrity.IntegrityError(
            f"{d}: states.npy / mask.npy / counts.npy / scale.npy changed since they were "
            f"written (content sha256 mismatch with {d}/manifest.json): corrupt; delete "
            f"{d} to re-encode"
        )


__all__ = ["PassageStates", "PassageStatesError", "STORAGE", "check_ids", "quantize_int8", "read_json"]
