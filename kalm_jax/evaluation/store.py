"""The passage-state store: every candidate passage encoded once, kept on disk, served at any coarser ratio.

A store directory belongs to one *key*: (model fingerprint, tokenizer fingerprint, max length, finest
ratio, pooling version, storage dtype). Layout::

    STORE/manifest.json          {"format": "kalm-jax-passage-store", "version": 1, "key": {...},
                                  "shards": [{"name": "shard-00000", "count": 4096}, ...]}
    STORE/r<ratio>/shard-00000/  a `PassageStates` directory (memory-mapped on read; ids.json inside)

Shards at the finest ratio come from the inference engine (`InferenceEngine.encode_ids`: length-sorted,
bucketed batches sharded over the local devices); shards at a coarser ratio are derived from them by exact
count-weighted re-pooling (`PassageStates.to_ratio`) the first time that ratio is asked for, and saved.
Opening a store whose key differs (another checkpoint, tokenizer, max length, ...) raises `StaleStoreError`
naming the differences, or, with ``on_stale="reencode"``, deletes it and starts over: never a silent reuse.
New passages are appended as new shards; the manifest is rewritten atomically after each finished shard,
so an interrupted encode keeps every shard it finished.

Writers hold the store's lock (`lock_path`: ``.<store>.lock`` beside the store directory, a `locks.file_lock`)
while they create, replace, extend (`ensure`) or derive (`shards_at`) it, so two sweeps sharing a store
directory never write at once: the second waits, with a logged message naming the holder, up to `lock_timeout`
seconds (default `LOCK_TIMEOUT`), then raises `StoreLocked` naming it. Under the lock `ensure` re-reads the
manifest from disk before it decides what to encode and how to name new shards, so passages another run added
meanwhile are used, not encoded again, and the manifest never names a passage twice or a shard that is not
complete on disk.

With several JAX processes (docs/multihost.md) every process calls `open` after process 0 (who creates
or replaces the store), then `ensure` together: each shard is split into one part per process, named
`shard-<n>-p<process>`, encoded and saved by that process; process 0 commits the manifest once after a
barrier. A store written by N processes opens in one like any other. Coarser ratios: call `shards_at` on
process 0 first (`distributed.primary_first`), as the sweep does. Only process 0 takes the store lock, for the
whole job's write (the other processes write their parts while it holds it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kalm_jax import atomic
from kalm_jax.inference.states import STORAGE, PassageStates, PassageStatesError, check_ids, read_json
from kalm_jax.locks import LockHeld, file_lock
from kalm_jax.model import mep
from kalm_jax.parallel import distributed

log = logging.getLogger(__name__)

FORMAT = "kalm-jax-passage-store"
MANIFEST = "manifest.json"
POOLING_VERSION = "mep-v1"
OnStale = Literal["error", "reencode"]
LOCK_TIMEOUT = 3600.0
"""Seconds a writer waits for another run's store lock before `StoreLocked` (eval: `store_lock_timeout`)."""


class StaleStoreError(ValueError):
    """The store on disk was written for another model / tokenizer / max length / ratio / storage."""


class StoreLocked(RuntimeError):
    """Another run held the store's lock for longer than the lock timeout (the message names the holder)."""


def lock_path(root: str | os.PathLike) -> Path:
    """The lock file of the store at `root`: ``.<name>.lock`` beside it (outside, so replacing a stale store
    keeps the lock in place)."""
    root = Path(root).absolute()
    return root.parent / f".{root.name}.lock"


@contextlib.contextmanager
def store_lock(root: str | os.PathLike, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Holds the lock of the store at `root` (waits up to `timeout` s with a logged message, then `StoreLocked`)."""
    root = Path(root).absolute()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                file_lock(
                    lock_path(root), timeout=timeout, what=f"another run is writing the passage-state store {root}"
                )
            )
        except LockHeld as e:
            raise StoreLocked(
                f"{root}: the passage-state store is locked by another run ({e.holder}); waited "
                f"{e.waited:.0f} s (lock timeout {timeout:g} s). Wait for that run, raise the "
                "timeout (eval: --config.store_lock_timeout), or use another store_dir"
            ) from None
        yield


def _read_manifest(manifest: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(stored key, validated shard list) of a store manifest."""
    data = read_json(manifest, "the store manifest")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{manifest}: format {found!r}, expected {FORMAT!r}")
    stored = data.get("key", {})
    if not isinstance(stored, dict):
        raise PassageStatesError(f"{manifest}: key must be an object, got {type(stored).__name__}")
    return stored, list(_check_shards(data.get("shards", []), manifest))


def _check_shards(shards, manifest: Path) -> list[dict[str, Any]]:
    """The manifest's shard list, validated: plain unique names (no `/`, `..` or absolute paths), counts >= 0."""
    if not isinstance(shards, list):
        raise PassageStatesError(f"{manifest}: shards must be a list, got {type(shards).__name__}")
    seen = set()
    for i, sh in enumerate(shards):
        name = sh.get("name") if isinstance(sh, dict) else None
        count = sh.get("count") if isinstance(sh, dict) else None
        if (
            not isinstance(name, str)
            or not name
            or name in (".", "..")
            or "/" in name
            or "\\" in name
            or Path(name).is_absolute()
        ):
            raise PassageStatesError(
                f"{manifest}: shard {i} has name {name!r}; shard names must be plain directory "
                "names inside the store (refusing paths that leave it)"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise PassageStatesError(f"{manifest}: shard {name!r} has count {count!r}, expected an integer >= 0")
        if name in seen:
            raise PassageStatesError(f"{manifest}: shard {name!r} is listed twice")
        seen.add(name)
    return shards


@dataclasses.dataclass(frozen=True)
class StoreKey:
    """What a store's contents depend on; any difference makes a stored state stale."""

    model: str
    tokenizer: str
    max_length: int
    ratio: int
    storage: str = "float32"
    pooling: str = POOLING_VERSION

    @classmethod
    def for_engine(cls, engine, ratio: int, storage: str = "float32") -> StoreKey:
        """The key of states encoded by `engine` (an `InferenceEngine`) at `ratio`, stored as `storage`."""
        if storage not in STORAGE:
            raise ValueError(f"unknown storage {storage!r}; choose from {STORAGE}")
        return cls(
            engine.model_fingerprint,
            engine.tokenizer.fingerprint(),
            int(engine.max_document_tokens),
            mep.check_ratio(ratio),
            storage,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _write_json_atomic(path: Path, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _length_shards(order: list[str], tokens: Mapping[str, list[int]], shard_size: int) -> Iterator[list[str]]:
    """Splits length-sorted (longest first) ids into shards of at most `shard_size` whose shortest passage
    is at least 3/4 of their longest (each shard is padded to its longest passage on disk)."""
    shard: list[str] = []
    for d in order:
        if shard and (len(shard) >= shard_size or 4 * len(tokens[d]) < 3 * len(tokens[shard[0]])):
            yield shard
            shard = []
        shard.append(d)
    if shard:
        yield shard


class PassageStore:
    """Sharded on-disk passage states for one `StoreKey` (a `rerank.StateSource`).

    Use `open` (checks the key), `ensure` (encodes what is missing), `lookup(doc_ids, ratio)` and `sizes`.
    """

    def __init__(self, root: Path, key: StoreKey, shards: list[dict[str, Any]]):
        self.root = root
        self.key = key
        self.shards = shards
        self._index: dict[str, tuple[int, int]] | None = None
        self._loaded: dict[int, list[PassageStates]] = {}
        self.encoded = 0
        """Passages this object encoded (0 when everything was already stored)."""
        self.lock_timeout = LOCK_TIMEOUT

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, root: str | os.PathLike, key: StoreKey, *, on_stale: OnStale = "error", lock_timeout: float = LOCK_TIMEOUT
    ) -> PassageStore:
        """Opens (or creates) the store at `root` for `key`.

        A store written for a different key raises `StaleStoreError` naming every differing field, or is
        deleted and recreated with ``on_stale="reencode"``. Holds the store lock meanwhile (process 0 only),
        waiting up to `lock_timeout` seconds for another writer (then `StoreLocked`); the store's later
        writes wait as long.
        """
        if on_stale not in ("error", "reencode"):
            raise ValueError(f"on_stale must be 'error' or 'reencode', got {on_stale!r}")
        root = Path(root).absolute()
        with store_lock(root, lock_timeout) if distributed.is_primary() else contextlib.nullcontext():
            store = cls._open(root, key, on_stale)
        store.lock_timeout = lock_timeout
        return store

    @classmethod
    def _open(cls, root: Path, key: StoreKey, on_stale: OnStale) -> PassageStore:
        manifest = root / MANIFEST
        if manifest.is_file():
            stored, shards = _read_manifest(manifest)
            diff = {k: (stored.get(k), v) for k, v in key.as_dict().items() if stored.get(k) != v}
            if not diff:
                return cls(root, key, shards)
            details = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
            if on_stale == "error":
                raise StaleStoreError(
                    f"{root}: passage-state store was written for a different setting ({details}). "
                    "Use another store directory, or on_stale='reencode' to delete and re-encode it."
                )
            log.warning("%s: stale passage-state store (%s); deleting it and re-encoding", root, details)
            shutil.rmtree(root)
        elif root.exists() and any(root.iterdir()):
            raise ValueError(f"{root}: exists, is not empty and has no {MANIFEST}; refusing to use it as a store")
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, key, [])
        store._write_manifest()
        return store

    def _reload(self) -> None:
        """Re-reads the shard list from disk (under the store lock): shards other runs added since `open`."""
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise PassageStatesError(f"{manifest}: missing; the store was deleted while this run used it")
        stored, shards = _read_manifest(manifest)
        diff = [k for k, v in self.key.as_dict().items() if stored.get(k) != v]
        if diff:
            raise StaleStoreError(
                f"{self.root}: another run replaced the store for a different setting ({diff}) since this run opened it"
            )
        if shards != self.shards:
            self.shards = shards
            self._index = None
            self._loaded.clear()

    def _next_shard_number(self) -> int:
        """A shard number no listed shard uses (names are `shard-<n>` or `shard-<n>-p<process>`)."""
        used = [
            int(sh["name"].split("-")[1])
            for sh in self.shards
            if sh["name"].startswith("shard-") and sh["name"].split("-")[1].isdigit()
        ]
        return max([len(self.shards), *(n + 1 for n in used)])

    def _write_manifest(self) -> None:
        _write_json_atomic(
            self.root / MANIFEST, {"format": FORMAT, "version": 1, "key": self.key.as_dict(), "shards": self.shards}
        )

    # ------------------------------------------------------------------ contents
    @property
    def index(self) -> dict[str, tuple[int, int]]:
        """doc id -> (shard number, row)."""
        if self._index is None:
            index = {}
            for s, shard in enumerate(self.shards):
                path = self._shard_dir(self.key.ratio, shard["name"]) / "ids.json"
                ids = check_ids(read_json(path, "the passage ids"), str(path), int(shard["count"]))
                for i, d in enumerate(ids):
                    if d in index:
                        raise PassageStatesError(
                            f"{path}: passage id {d!r} is also in shard {self.shards[index[d][0]]['name']}"
                        )
                    index[d] = (s, i)
            self._index = index
        return self._index

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.index

    def __len__(self) -> int:
        return sum(int(s["count"]) for s in self.shards)

    def missing(self, doc_ids: Iterable[str]) -> list[str]:
        """Doc ids (deduplicated, in first-seen order) that have no stored states."""
        index = self.index
        return list(dict.fromkeys(d for d in doc_ids if d not in index))

    def _shard_dir(self, ratio: int, name: str) -> Path:
        return self.root / f"r{ratio}" / name

    # ------------------------------------------------------------------ encoding
    def ensure(
        self,
        engine,
        texts: Mapping[str, str],
        doc_ids: Iterable[str],
        *,
        batch_size: int | None = None,
        shard_size: int = 4096,
        progress: bool = True,
    ) -> int:
        """Encodes the passages of `doc_ids` that are not stored yet; returns how many were encoded.

        Runs under the store lock (process 0 takes it; every process then re-reads the manifest), so
        passages another run stored since `open` are not encoded again.

        Args:
          engine: the `InferenceEngine` of the store's model (its fingerprint and document limit must match
            the store's key).
          texts: doc id -> passage text (`BeirDataset.passage`); the document prefix is added by the engine.
          batch_size: passages per encoder call (default: the engine's).
          shard_size: at most this many passages per shard directory; a shard also ends where passages
            get shorter than 3/4 of its longest, so padding to the longest costs at most a third.
        """
        if engine.model_fingerprint != self.key.model or int(engine.max_document_tokens) != self.key.max_length:
            raise ValueError(
                f"{self.root}: this engine (model {engine.model_fingerprint}, max_document_tokens "
                f"{engine.max_document_tokens}) does not match the store's key (model {self.key.model}, "
                f"max_length {self.key.max_length})"
            )
        doc_ids = list(doc_ids)
        primary = distributed.is_primary()
        with contextlib.ExitStack() as stack:
            refused = None
            if primary:
                try:
                    stack.enter_context(store_lock(self.root, self.lock_timeout))
                except StoreLocked as e:
                    refused = e
            # the others wait for process 0's (possibly long) lock wait in a barrier, not in the collective below
            distributed.barrier(f"passage_store_lock_tried:{self.root}")
            if distributed.any_process(refused is not None):
                raise refused or StoreLocked(f"{self.root}: process 0 could not lock the passage-state store")
            if primary:
                self._reload()
            distributed.barrier(f"passage_store_locked:{self.root}")
            if not primary:
                self._reload()  # process 0 holds the lock: the manifest is the one it read
            return self._ensure_locked(engine, texts, doc_ids, batch_size, shard_size, progress)

    def _ensure_locked(
        self,
        engine,
        texts: Mapping[str, str],
        doc_ids: list[str],
        batch_size: int | None,
        shard_size: int,
        progress: bool,
    ) -> int:
        todo = self.missing(doc_ids)
        absent = [d for d in todo if d not in texts]
        if absent:
            raise KeyError(f"{len(absent)} doc ids to encode have no text, e.g. {absent[:5]}")
        if not todo:
            return 0
        from tqdm.auto import tqdm

        tokens: dict[str, list[int]] = {}
        step = 1024
        for start in tqdm(
            range(0, len(todo), step), desc="tokenize passages", unit="batch", disable=not progress, dynamic_ncols=True
        ):
            chunk = todo[start : start + step]
            tokens.update(zip(chunk, engine.document_ids([texts[d] for d in chunk], warn=False)))
        empty = [d for d in todo if not tokens[d]]
        if empty:
            raise ValueError(f"{len(empty)} passages tokenize to nothing, e.g. {empty[:5]}")
        order = sorted(todo, key=lambda d: (-len(tokens[d]), d))
        import jax

        if jax.process_count() > 1:
            return self._ensure_split(
                engine, tokens, list(_length_shards(order, tokens, shard_size)), batch_size, progress
            )
        with tqdm(
            total=len(order),
            desc=f"encode passages (r={self.key.ratio})",
            unit="doc",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar:
            for shard_ids in _length_shards(order, tokens, shard_size):
                states = engine.encode_ids(
                    [tokens[d] for d in shard_ids],
                    self.key.ratio,
                    ids=list(shard_ids),
                    storage=self.key.storage,
                    batch_size=batch_size,
                    show_progress=False,
                )
                self._add_shard(states)
                bar.update(len(shard_ids))
        self.encoded += len(order)
        return len(order)

    def _ensure_split(
        self, engine, tokens: Mapping[str, list[int]], plan: list[list[str]], batch_size: int | None, progress: bool
    ) -> int:
        """Multi-process `ensure` (every process calls it with the same plan): shard j of the plan is split
        into one contiguous part per process; process p encodes and saves its part as `shard-{n}-p{p}` (n:
        the shard's number in the store, so names never collide); after a barrier process 0 commits the
        manifest once. A part already saved by an interrupted run (same ids, same key) is kept."""
        import jax

        from kalm_jax.parallel import distributed

        rank, nproc = jax.process_index(), jax.process_count()
        base = self._next_shard_number()
        parts: list[dict[str, Any]] = []
        mine = 0
        for j, shard_ids in enumerate(plan):
            bounds = np.linspace(0, len(shard_ids), nproc + 1).round().astype(int)
            for p in range(nproc):
                ids = shard_ids[bounds[p] : bounds[p + 1]]
                if not ids:
                    continue
                name = f"shard-{base + j:05d}-p{p}"
                parts.append({"name": name, "count": len(ids)})
                if p != rank or self._holds(name, ids):
                    continue
                states = engine.encode_ids(
                    [tokens[d] for d in ids],
                    self.key.ratio,
                    ids=list(ids),
                    storage=self.key.storage,
                    batch_size=batch_size,
                    show_progress=False,
                )
                states.meta = {**self.key.as_dict(), "shard": name}
                states.save(self._shard_dir(self.key.ratio, name), overwrite=True)
                mine += len(ids)
        log.info("%s: process %d encoded %d of %d passages", self.root, rank, mine, sum(p["count"] for p in parts))
        distributed.barrier(f"passage_store_encoded:{self.root}")
        self.shards.extend(parts)
        if distributed.is_primary():
            self._write_manifest()
        distributed.barrier(f"passage_store_manifest:{self.root}")
        self._index = None
        self._loaded.pop(self.key.ratio, None)
        encoded = sum(p["count"] for p in parts)
        self.encoded += encoded
        return encoded

    def _holds(self, name: str, ids: Sequence[str]) -> bool:
        """Whether shard directory `name` is complete, for this key and exactly these ids."""
        d = self._shard_dir(self.key.ratio, name)
        if not (d / "manifest.json").is_file():
            return False
        try:
            states = PassageStates.load(d, expect_meta=self.key.as_dict())
        except (ValueError, OSError):
            return False
        return states.ids is not None and list(states.ids) == list(ids)

    def _add_shard(self, states: PassageStates) -> None:
        """Saves one complete shard, then lists it in the manifest (call under the store lock, after `_reload`)."""
        index = self.index
        if states.ids is None or any(d in index for d in states.ids):
            raise PassageStatesError(f"{self.root}: refusing a shard without ids or with ids already stored")
        name = f"shard-{self._next_shard_number():05d}"
        states.meta = {**self.key.as_dict(), "shard": name}
        states.save(self._shard_dir(self.key.ratio, name), overwrite=True)
        self.shards.append({"name": name, "count": len(states)})
        self._write_manifest()
        index.update((d, (len(self.shards) - 1, i)) for i, d in enumerate(states.ids))
        self._loaded.pop(self.key.ratio, None)

    # ------------------------------------------------------------------ reading
    def shards_at(self, ratio: int) -> list[PassageStates]:
        """Memory-mapped shards at `ratio` (derived from the finest ratio and saved if not yet on disk)."""
        ratio = mep.check_ratio(ratio)
        if ratio % self.key.ratio:
            raise ValueError(
                f"{self.root}: ratio {ratio} cannot be derived from the stored ratio {self.key.ratio} "
                f"(it must be a multiple of it)"
            )
        if ratio in self._loaded and len(self._loaded[ratio]) == len(self.shards):
            return self._loaded[ratio]
        expect = self.key.as_dict()
        stale = [sh["name"] for sh in self.shards if ratio != self.key.ratio and self._derived_stale(ratio, sh["name"])]
        if stale:  # deriving writes the store: under its lock (process 0; the others find them derived after it)
            with store_lock(self.root, self.lock_timeout) if distributed.is_primary() else contextlib.nullcontext():
                for name in stale:
                    if self._derived_stale(ratio, name):  # another run may have derived it meanwhile
                        self._derive(ratio, name)
        out = []
        for shard in self.shards:
            d = self._shard_dir(ratio, shard["name"])
            states = PassageStates.load(d, expect_meta=expect)
            hidden = out[0].states.shape[2] if out else None
            if hidden is not None and states.states.shape[2] != hidden:
                raise PassageStatesError(f"{d}: hidden size {states.states.shape[2]}, other shards have {hidden}")
            if states.ratio != ratio or len(states) != shard["count"]:
                raise ValueError(
                    f"{d}: holds {len(states)} passages at ratio {states.ratio}, manifest says "
                    f"{shard['count']} at ratio {ratio}"
                )
            out.append(states)
        self._loaded[ratio] = out
        return out

    def _derived_stale(self, ratio: int, name: str) -> bool:
        """Whether shard `name` at the coarser `ratio` is missing or was derived from another finest shard: a
        derived shard records the content hash of the finest shard it came from, so a finest shard that
        changed since (re-encoded, replaced) makes it stale, and it is derived again."""
        d = self._shard_dir(ratio, name)
        source = PassageStates.stored_content(self._shard_dir(self.key.ratio, name))
        return (
            not (d / "manifest.json").is_file()
            or PassageStates.stored_content(d) is None
            or (PassageStates.load(d, expect_meta=self.key.as_dict(), verify=False).meta.get("derived_from") != source)
        )

    def _derive(self, ratio: int, name: str) -> None:
        d, src = self._shard_dir(ratio, name), self._shard_dir(self.key.ratio, name)
        if (d / "manifest.json").is_file():
            log.warning("%s: its source %s changed since it was derived; deriving it again", d, src)
        derived = PassageStates.load(src, expect_meta=self.key.as_dict()).to_ratio(ratio)
        derived.meta = {**derived.meta, "derived_from": PassageStates.stored_content(src)}
        derived.save(d, overwrite=True)

    def lookup(self, doc_ids: Sequence[str], ratio: int) -> PassageStates:
        """States of `doc_ids` (in that order) at `ratio`, read from the memory-mapped shards."""
        index = self.index
        missing = [d for d in doc_ids if d not in index]
        if missing:
            raise KeyError(f"{self.root}: {len(missing)} doc ids are not in the store, e.g. {missing[:3]}")
        shards = self.shards_at(ratio)
        where = np.asarray([index[d] for d in doc_ids], np.int64).reshape(-1, 2)
        parts, positions = [], []
        for s in np.unique(where[:, 0]):
            pos = np.flatnonzero(where[:, 0] == s)
            parts.append(shards[int(s)].select(where[pos, 1]))
            positions.append(pos)
        merged = PassageStates.concatenate(parts)
        inverse = np.empty(len(doc_ids), np.int64)
        inverse[np.concatenate(positions)] = np.arange(len(doc_ids))
        return merged.select(inverse)

    def sizes(self, ratio: int) -> dict[str, float]:
        """Cache cost at `ratio`: ``passages``, ``bytes`` (on disk), ``bytes_per_passage`` (on disk) and
        ``state_bytes_per_passage`` (states of the windows passages use: mean ceil(L/r) × H × itemsize,
        plus mask/count/scale bytes)."""
        shards = self.shards_at(ratio)
        n = sum(len(s) for s in shards)
        total = sum(_dir_bytes(self._shard_dir(ratio, sh["name"])) for sh in self.shards)
        used = sum(s.bytes_per_passage * len(s) for s in shards)
        return {
            "passages": float(n),
            "bytes": float(total),
            "bytes_per_passage": total / max(1, n),
            "state_bytes_per_passage": used / max(1, n),
        }


__all__ = ["PassageStore", "StoreKey", "StaleStoreError", "POOLING_VERSION"]
