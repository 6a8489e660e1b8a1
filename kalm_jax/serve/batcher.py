"""The token-budget micro-batcher: work items from every request, grouped by shape, run by one engine thread.

Requests submit *items*: documents to encode (`EncodeKey`: ratio, padded encoder length) and (prompt, passage)
pairs to score (`ScoreKey`: ratio, the passage's registration ratio, padded prompt length, padded window count).
The key is computed from the item alone with the engine's `Buckets`, and each key runs with a fixed number of
rows (`rows_for`: ``max_batch_tokens`` // the key's padded tokens, a power of two, at most ``max_batch_rows``,
rounded by the engine to its device count); a partly filled call is padded with copies of its first item. So
every engine call of a key has the same shapes whatever was batched with it, which is what makes a score
independent of the other requests, bit for bit (XLA's per-row results depend on the batch's shape, not on the
other rows' values), and bounds the number of compiled programs by the number of keys.

The engine thread takes the key whose oldest item has waited longest; it runs it when the key has a full call
of items or that item has waited ``max_wait_ms``. Items whose future is cancelled (their client went away)
leave the queue at once, or are dropped before the call when the thread already took them. Scoring goes
through `InferenceEngine.margins`, from the device tier's slab (`PassageCache.device_slab`) when every item of
the call is there, else from the items' host states.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.inference.states import PassageStates

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncodeKey:
    """Documents encoded at `ratio`, padded to `length` encoder tokens (`Buckets.document_length`)."""

    ratio: int
    length: int

    @property
    def tokens(self) -> int:
        return self.length


@dataclasses.dataclass(frozen=True)
class ScoreKey:
    """Pairs scored at `ratio` from states registered at `base_ratio`; prompts padded to `decoder` tokens,
    passages to `windows` windows at `ratio` (`Buckets.decoder_length`, `Buckets.window_count`)."""

    ratio: int
    base_ratio: int
    decoder: int
    windows: int

    @property
    def tokens(self) -> int:
        return self.decoder + self.windows


@dataclasses.dataclass
class ScoreItem:
    """One pair: decoder prompt ids, the passage's states (one row at the key's base ratio) and, for a
    registered passage, its cache entry (for the device tier)."""

    prompt: Sequence[int]
    states: PassageStates
    entry: Any = None


@dataclasses.dataclass
class _Work:
    key: EncodeKey | ScoreKey
    payload: Any
    request: int
    future: concurrent.futures.Future
    t: float


class Batcher:
    """One engine thread fed by every request; see the module docstring.

    Args:
      engine: the inference engine (used by this thread only once `start` is called).
      cache: the `PassageCache` (its device tier's slabs).
      metrics: a `kalm_jax.serve.metrics.Metrics`, or None.
      max_batch_tokens: padded tokens per call that set a key's rows.
      max_batch_rows: rows per call at most.
      max_wait_ms: how long the oldest item of a partly filled call waits for more.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        cache,
        metrics=None,
        *,
        max_batch_tokens: int = 16384,
        max_batch_rows: int = 32,
        max_wait_ms: float = 5.0,
    ):
        if max_batch_rows < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_rows and max_batch_tokens must be positive")
        self.engine = engine
        self.cache = cache
        self.metrics = metrics
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_rows = 1 << (int(max_batch_rows).bit_length() - 1)
        self.max_wait = float(max_wait_ms) / 1000.0
        self._cv = threading.Condition()
        self._pending: dict[Any, collections.deque[_Work]] = {}
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.queued = 0
        self.shapes: set[tuple[str, Any, int]] = set()

    # ------------------------------------------------------------------ keys
    def encode_key(self, tokens: Sequence[int], ratio: int) -> EncodeKey:
        return EncodeKey(ratio, self.engine.buckets.document_length(len(tokens), ratio))

    def score_key(self, prompt: Sequence[int], states: PassageStates, ratio: int) -> ScoreKey:
        windows = -(-int(np.asarray(states.mask).sum()) // (ratio // states.ratio))
        b = self.engine.buckets
        return ScoreKey(ratio, states.ratio, b.decoder_length(len(prompt)), b.window_count(windows))

    def rows_for(self, key: EncodeKey | ScoreKey) -> int:
        """Rows of every engine call of `key` (a function of the key alone)."""
        fit = max(1, self.max_batch_tokens // max(1, key.tokens))
        return self.engine.rows(min(self.max_batch_rows, 1 << (fit.bit_length() - 1)))

    # ------------------------------------------------------------------ submission (any thread)
    def submit(self, items: Sequence[tuple[Any, Any]], request: int) -> list[concurrent.futures.Future]:
        """Queues (key, payload) items of one request; their futures resolve to a `PassageStates` row (encode)
        or an fp32 margin (score)."""
        now = time.monotonic()
        work = [_Work(k, p, request, concurrent.futures.Future(), now) for k, p in items]
        with self._cv:
            if self._stopping and self._thread is None:
                raise RuntimeError("the batcher is stopped")
            for w in work:
                self._pending.setdefault(w.key, collections.deque()).append(w)
            self.queued += len(work)
            self._cv.notify()
        for w in work:
            w.future.add_done_callback(lambda f, w=w: self._forget(w) if f.cancelled() else None)
        return [w.future for w in work]

    def _forget(self, w: _Work) -> None:
        """Takes a cancelled item out of the queue (its client went away) so it neither waits nor counts."""
        with self._cv:
            queue = self._pending.get(w.key)
            if queue is None or w not in queue:
                return  # already taken by the engine thread, which drops it
            queue.remove(w)
            if not queue:
                del self._pending[w.key]
            self.queued -= 1

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Runs ``fn()`` on the engine thread, before any queued batch (warm-up)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    # ------------------------------------------------------------------ the engine thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kalm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Runs what is queued, then stops the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _next(self):
        """Under the lock: a control call, or (key, items) ready to run, or None to stop; waits otherwise."""
        while True:
            if self._calls:
                return self._calls.popleft()
            if not self._pending:
                if self._stopping:
                    return None
                self._cv.wait()
                continue
            key, queue = min(self._pending.items(), key=lambda kv: kv[1][0].t)
            rows = self.rows_for(key)
            wait = queue[0].t + self.max_wait - time.monotonic()
            if len(queue) >= rows or wait <= 0 or self._stopping:
                take = [queue.popleft() for _ in range(min(rows, len(queue)))]
                if not queue:
                    del self._pending[key]
                self.queued -= len(take)
                return key, take
            self._cv.wait(wait)

    def _loop(self) -> None:
        while True:
            with self._cv:
                job = self._next()
            if job is None:
                return
            first, second = job
            if callable(first):
                if second.set_running_or_notify_cancel():
                    try:
                        second.set_result(first())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        second.set_exception(e)
                continue
            live = [w for w in second if w.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self._run(first, live)
            except BaseException as e:  # noqa: BLE001 - every waiting request gets the error
                log.exception("engine call failed for %s", first)
                for w in live:
                    w.future.set_exception(e)
                continue
            for w, r in zip(live, results):
                w.future.set_result(r)

    def _run(self, key, work: list[_Work]) -> list:
        rows = self.rows_for(key)
        payloads = [w.payload for w in work]
        padded = payloads + [payloads[0]] * (rows - len(payloads))
        kind = "encode" if isinstance(key, EncodeKey) else "score"
        self.shapes.add((kind, key, rows))
        if isinstance(key, EncodeKey):
            states = self.engine.encode_ids(padded, key.ratio, batch_size=rows, show_progress=False)
            out = [states.select([i]) for i in range(len(payloads))]
            tokens = sum(len(p) for p in payloads)
        else:
            out = [float(m) for m in self._score(key, padded, rows)[: len(payloads)]]
            tokens = sum(len(p.prompt) + int(np.asarray(p.states.mask).sum()) for p in payloads)
        if self.metrics is not None:
            m = self.metrics
            m.batch_size.labels(kind).observe(len(payloads))
            m.batch_rows.labels(kind).observe(rows)
            m.batch_tokens.labels(kind).observe(tokens)
            m.batch_requests.labels(kind).observe(len({w.request for w in work}))
            (m.documents if kind == "encode" else m.pairs).inc(len(payloads))
        return out

    def _score(self, key: ScoreKey, items: list[ScoreItem], rows: int) -> np.ndarray:
        prompts = [list(it.prompt) for it in items]
        idx = np.arange(rows)
        if all(it.entry is not None and it.entry.device for it in items):
            slab = self.cache.device_slab(self.engine, key.base_ratio, key.ratio)
            if slab is not None and all(it.entry.version in slab[1] for it in items):
                placed, row_of = slab
                passage_of = np.array([row_of[it.entry.version] for it in items])
                return self.engine.margins(prompts, idx, placed, passage_of, batch_size=rows, show_progress=False)
        states = PassageStates.concatenate([it.states for it in items])
        return self.engine.margins(prompts, idx, states, idx, ratio=key.ratio, batch_size=rows, show_progress=False)


__all__ = ["Batcher", "EncodeKey", "ScoreKey", "ScoreItem"]
