"""Cached passage states: pooled encoder states + masks + window counts, with exact re-pooling and storage.

On disk a `PassageStates` is a directory:
  `manifest.json`  {"format": "kalm-jax-passage-states", "version": 1, "ratio", "storage", "shape",
                    "ids_file", "meta": {...fingerprints, max_length, ...}}
  `states.npy` [P, C, H] (float32, bfloat16 stored as uint16 bits, or int8), `scale.npy` [P, C] (int8 only),
  `mask.npy` [P, C] int8, `counts.npy` [P, C] int32, `ids.json` (optional passage ids).
Files are memory-mapped on load, so a large store is not read into memory until rows are selected.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from kalm_jax import mep
from kalm_jax.atomic import atomic_directory

FORMAT = "kalm-jax-passage-states"
STORAGE = ("float32", "bfloat16", "int8")


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
            raise ValueError(f"inconsistent shapes: states {self.states.shape}, mask {self.mask.shape}, "
                             f"counts {self.counts.shape}")
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
        if self.scale is not None:
            return (self.states.astype(np.float32) * self.scale[..., None]).astype(dtype)
        return np.asarray(self.states).astype(dtype)

    def select(self, rows: Sequence[int] | np.ndarray, *, trim: bool = True) -> "PassageStates":
        """Rows `rows` (in that order); with `trim`, windows beyond the longest selected passage are dropped."""
        rows = np.asarray(rows, dtype=np.int64)
        mask = np.asarray(self.mask[rows])
        width = int(mask.sum(axis=0).nonzero()[0].max()) + 1 if trim and mask.any() else mask.shape[1]
        return PassageStates(
            states=np.asarray(self.states[rows, :width]), mask=mask[:, :width],
            counts=np.asarray(self.counts[rows, :width]), ratio=self.ratio,
            ids=[self.ids[i] for i in rows] if self.ids is not None else None,
            scale=np.asarray(self.scale[rows, :width]) if self.scale is not None else None, meta=dict(self.meta))

    def repool(self, factor: int) -> "PassageStates":
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
        factor = mep._check_ratio(factor)
        pooled, pmask, counts = mep.repool(self.dense(np.float32), self.counts, factor)
        out = PassageStates(np.asarray(pooled), np.asarray(pmask, np.int8), np.asarray(counts, np.int32),
                            self.ratio * factor, self.ids, meta=dict(self.meta))
        return out.to_storage(self.storage)

    def to_ratio(self, ratio: int) -> "PassageStates":
        """These states at `ratio`, which must be a multiple of the stored ratio."""
        if ratio % self.ratio:
            raise ValueError(f"cannot derive ratio {ratio} from states pooled at ratio {self.ratio}: "
                             f"it must be a multiple of {self.ratio}")
        return self if ratio == self.ratio else self.repool(ratio // self.ratio)

    def to_storage(self, storage: str) -> "PassageStates":
        """Converts to float32, bfloat16 or int8 (symmetric per-window absmax quantisation)."""
        if storage not in STORAGE:
            raise ValueError(f"unknown storage {storage!r}; choose from {STORAGE}")
        if storage == self.storage:
            return self
        dense = self.dense(np.float32)
        scale = None
        if storage == "int8":
            scale = np.maximum(np.abs(dense).max(axis=-1), 1e-12).astype(np.float32) / 127.0
            states = np.clip(np.rint(dense / scale[..., None]), -127, 127).astype(np.int8)
        elif storage == "bfloat16":
            states = dense.astype(ml_dtypes.bfloat16)
        else:
            states = dense
        return dataclasses.replace(self, states=states, scale=scale)

    @classmethod
    def concatenate(cls, parts: Sequence["PassageStates"]) -> "PassageStates":
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
        return cls(np.concatenate([pad(np.asarray(p.states)) for p in parts]),
                   np.concatenate([pad(np.asarray(p.mask)) for p in parts]),
                   np.concatenate([pad(np.asarray(p.counts)) for p in parts]), parts[0].ratio, ids, scale,
                   dict(parts[0].meta))

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
            manifest = {"format": FORMAT, "version": 1, "ratio": self.ratio, "storage": self.storage,
                        "shape": list(self.states.shape), "has_ids": self.ids is not None, "meta": self.meta}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, *, expect_meta: dict[str, Any] | None = None,
             mmap: bool = True) -> "PassageStates":
        """Reads a directory written by `save`.

        expect_meta: entries (e.g. model/tokenizer fingerprints, max_length) that must equal the stored
        meta; a mismatch raises ValueError naming the differing keys (a stale cache is never reused).
        """
        d = Path(directory)
        manifest_path = d / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{d}: no manifest.json (not a passage-state directory)")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        meta = manifest.get("meta", {})
        if expect_meta:
            diff = {k: (meta.get(k), v) for k, v in expect_meta.items() if meta.get(k) != v}
            if diff:
                details = ", ".join(f"{k}: stored {a!r} vs expected {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"{d}: passage states were written for a different setting ({details})")
        mode = "r" if mmap else None
        states = np.load(d / "states.npy", mmap_mode=mode)
        if manifest["storage"] == "bfloat16":
            states = states.view(ml_dtypes.bfloat16)
        scale = np.load(d / "scale.npy", mmap_mode=mode) if (d / "scale.npy").exists() else None
        ids = json.loads((d / "ids.json").read_text()) if manifest.get("has_ids") else None
        out = cls(states, np.load(d / "mask.npy", mmap_mode=mode), np.load(d / "counts.npy", mmap_mode=mode),
                  int(manifest["ratio"]), ids, scale, meta)
        if list(out.states.shape) != manifest["shape"]:
            raise ValueError(f"{d}: states.npy has shape {out.states.shape}, manifest says {manifest['shape']}")
        return out


__all__ = ["PassageStates", "STORAGE"]
