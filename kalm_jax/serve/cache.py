"""Passage states registered by id: device-resident while they fit a budget, host memory beyond it, then a store.

Each registered passage is one `Entry`: its text, its pooled states (one `PassageStates` row at the ratio it was
registered at) and a version number, new at every registration, so a request that resolved an id keeps the
states it resolved even when the id is re-registered or deleted meanwhile (a replacement is atomic: a request
sees the old states or the new, never a mix).

Tiers:
  * device: entries are admitted in registration order while the sum of their states' bytes fits
    ``device_bytes``; the engine thread places them once per (registration ratio, scoring ratio) as one
    replicated `DeviceStates` slab (`InferenceEngine.place`, re-pooled on the device for coarser ratios) and
    scores them by gathering rows on the device. Admission, replacement or deletion of a device entry drops
    the slabs; the next batch that needs one places it again.
  * host: every other entry keeps its states in host memory, least recently used last; beyond
    ``host_bytes`` the least recently used are written to ``store_dir`` (one `PassageStates` directory each,
    read back on use) or, without a store directory, forgotten (a later request naming them gets a 404).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from kalm_jax.inference.engine import DeviceStates, InferenceEngine
from kalm_jax.inference.states import PassageStates

ENTRY_PREFIX = "passage-"
"""Directories this cache writes under its store directory (and removes at start)."""


@dataclasses.dataclass(eq=False)
class Entry:
    """One registered passage.

    states: `PassageStates` [1, C, H] at `ratio` (None while spilled to `path`). windows: windows holding tokens
    at `ratio`. nbytes: bytes of `states`. device: admitted to the device tier.
    """

    id: str
    text: str
    ratio: int
    windows: int
    version: int
    nbytes: int
    states: PassageStates | None = None
    path: Path | None = None
    device: bool = False


class PassageCache:
    """Registered passages by id (thread-safe; `device_slab` is called by the engine thread only).

    Args:
      device_bytes: budget of device-resident states (bytes of the registered states, per device).
      host_bytes: budget of host-resident states outside the device tier.
      store_dir: where entries beyond the host budget are written (None: they are dropped).
    """

    def __init__(self, device_bytes: int, host_bytes: int, store_dir: str | Path | None = None):
        self.device_bytes = int(device_bytes)
        self.host_bytes = int(host_bytes)
        self.store_dir = Path(store_dir) if store_dir else None
        if self.store_dir is not None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            for old in self.store_dir.glob(f"{ENTRY_PREFIX}*"):
                shutil.rmtree(old, ignore_errors=True)
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._versions = itertools.count(1)
        self._device_used = 0
        self._host_used = 0
        self._disk_used = 0
        self._slabs: dict[tuple[int, int], tuple[DeviceStates, dict[int, int]]] = {}
        self.hits = {"device": 0, "host": 0, "disk": 0}
        self.misses = 0
        self.evictions = 0
        self.slab_builds = 0

    # ------------------------------------------------------------------ registration
    def put(self, passage_id: str, text: str, states: PassageStates) -> Entry:
        """Registers (or atomically replaces) `passage_id` with one row of states."""
        if len(states) != 1:
            raise ValueError(f"one row of states per passage, got {len(states)}")
        states = dataclasses.replace(states, ids=[passage_id])
        nbytes = int(states.states.nbytes + states.mask.nbytes + states.counts.nbytes)
        windows = int(np.asarray(states.mask).sum())
        with self._lock:
            entry = Entry(passage_id, text, states.ratio, windows, next(self._versions), nbytes, states)
            old = self._entries.pop(passage_id, None)
            if old is not None:
                self._release(old)
            if self._device_used + nbytes <= self.device_bytes:
                entry.device = True
                self._device_used += nbytes
                self._slabs.clear()
            else:
                self._host_used += nbytes
            self._entries[passage_id] = entry
            self._enforce_host_budget()
            return entry

    def delete(self, passage_id: str) -> bool:
        """Forgets `passage_id`; False when it was not registered."""
        with self._lock:
            old = self._entries.pop(passage_id, None)
            if old is None:
                return False
            self._release(old)
            return True

    def _release(self, entry: Entry) -> None:
        if entry.device:
            self._device_used -= entry.nbytes
            self._slabs.clear()
        elif entry.states is not None:
            self._host_used -= entry.nbytes
        if entry.path is not None:
            self._disk_used -= entry.nbytes
            shutil.rmtree(entry.path, ignore_errors=True)
            entry.path = None

    def _enforce_host_budget(self) -> None:
        for key in list(self._entries):
            if self._host_used <= self.host_bytes:
                return
            entry = self._entries[key]
            if entry.device or entry.states is None:
                continue
            if self.store_dir is not None:
                name = hashlib.sha256(entry.id.encode()).hexdigest()[:32]
                entry.path = entry.states.save(self.store_dir / f"{ENTRY_PREFIX}{name}-v{entry.version}")
                self._disk_used += entry.nbytes
                entry.states = None
            else:
                del self._entries[key]
                self.evictions += 1
            self._host_used -= entry.nbytes

    # ------------------------------------------------------------------ lookup
    def get(self, passage_id: str) -> tuple[Entry, PassageStates]:
        """The entry and its states (read back from the store directory when spilled); KeyError if unknown."""
        with self._lock:
            entry = self._entries.get(passage_id)
            if entry is None:
                self.misses += 1
                raise KeyError(passage_id)
            self._entries.move_to_end(passage_id)
            if entry.device:
                self.hits["device"] += 1
                return entry, entry.states
            if entry.states is not None:
                self.hits["host"] += 1
                return entry, entry.states
            self.hits["disk"] += 1
            states = PassageStates.load(entry.path, mmap=False)
            shutil.rmtree(entry.path, ignore_errors=True)
            entry.path, entry.states = None, states
            self._disk_used -= entry.nbytes
            self._host_used += entry.nbytes
            self._enforce_host_budget()
            return entry, states

    def tier(self, passage_id: str) -> str | None:
        with self._lock:
            entry = self._entries.get(passage_id)
            if entry is None:
                return None
            return "device" if entry.device else "host" if entry.states is not None else "disk"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # ------------------------------------------------------------------ device tier (engine thread)
    def device_slab(
        self, engine: InferenceEngine, base_ratio: int, ratio: int
    ) -> tuple[DeviceStates, dict[int, int]] | None:
        """The device tier's entries registered at `base_ratio`, placed at `ratio`: (slab, version -> row), or
        None when the tier holds none. Placed on first use after any change to the tier."""
        with self._lock:
            slab = self._slabs.get((base_ratio, ratio))
            if slab is not None:
                return slab
            members = [e for e in self._entries.values() if e.device and e.ratio == base_ratio]
            if not members:
                return None
            host = PassageStates.concatenate([e.states for e in members])
            rows = {e.version: i for i, e in enumerate(members)}
        placed = engine.place(host, ratio=ratio, show_progress=False)
        with self._lock:
            # the tier may have changed while placing: keep the slab for this request's batch only
            if all(self._entries.get(e.id) is e for e in members) and len(rows) == sum(
                e.device and e.ratio == base_ratio for e in self._entries.values()
            ):
                self._slabs[(base_ratio, ratio)] = (placed, rows)
            self.slab_builds += 1
        return placed, rows

    # ------------------------------------------------------------------ accounting
    def stats(self) -> dict[str, dict[str, int]]:
        """Entries and bytes per tier (device: registered states' bytes; the placed slabs' bytes separately)."""
        with self._lock:
            entries = {"device": 0, "host": 0, "disk": 0}
            for e in self._entries.values():
                entries["device" if e.device else "host" if e.states is not None else "disk"] += 1
            return {
                "entries": entries,
                "bytes": {
                    "device": self._device_used,
                    "host": self._host_used,
                    "disk": self._disk_used,
                    "slabs": sum(s.nbytes for s, _ in self._slabs.values()),
                },
            }


__all__ = ["PassageCache", "Entry", "ENTRY_PREFIX"]
