"""The rerank server's routes and schemas (FastAPI) over one `Service`: one engine, one batcher, one cache.

Routes (docs/serving.md has a curl example of each):
  POST /v2/rerank        Cohere v2: {model, query, documents, top_n, max_tokens_per_doc} -> {id, results, meta}
  POST /v1/rerank        Jina / vLLM: {model, query, documents, top_n, return_documents, instruction}
                         -> {model, usage, results: [{index, relevance_score, document}]}
  POST /rerank           text-embeddings-inference: {query, texts, raw_scores, return_text, truncate,
                         truncation_direction} -> [{index, score, text}]
  POST /v1/passages      register passages by id: {passages: [{id, text}], ratio}
  GET|DELETE /v1/passages/{id}
  GET /health, GET /metrics (public even with an API key)
Every rerank route also takes ``instruction``, ``ratio`` (any multiple of a registered passage's ratio) and
``top_n``, and documents as strings, ``{"text"}`` or ``{"id"}`` (a registered passage: only the decoder runs).
Errors are ``{"error", "error_type"}`` (plus ``message``, which Cohere's client reads): 400 empty documents,
401 missing/wrong API key, 404 unknown passage id, 413 body over the payload limit, 422 validation (the field
named) or too many documents, 429 too many requests in flight, 503 not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, model_validator

from kalm_jax.inference.engine import InferenceEngine, probability
from kalm_jax.inference.states import PassageStates
from kalm_jax.model import mep
from kalm_jax.serve.batcher import Batcher, ScoreItem
from kalm_jax.serve.cache import PassageCache
from kalm_jax.serve.metrics import Metrics
from kalm_jax.text import prompts

log = logging.getLogger(__name__)

API_KEY_ENV = "KALM_API_KEY"
WARMUP_TEXT = "warm up"


class ApiError(Exception):
    """An error answered as ``{"error", "error_type"}`` with `status`."""

    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


def error_response(status: int, message: str, error_type: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type, "message": message}, status_code=status)


# ---------------------------------------------------------------------------------------------- schemas
class Document(BaseModel):
    """A document given as ``{"text": ...}`` or as a registered passage ``{"id": ...}``."""

    text: str | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.text is None) == (self.id is None):
            raise ValueError('a document object needs exactly one of "text" or "id"')
        return self


DocumentIn = str | Document


class _RerankCommon(BaseModel):
    query: str
    top_n: int | None = Field(default=None, ge=1)
    instruction: str | None = None
    ratio: int | None = Field(default=None, ge=1)


class CohereRequest(_RerankCommon):
    model: str | None = None
    documents: list[DocumentIn]
    max_tokens_per_doc: int | None = Field(default=None, ge=1)


class JinaRequest(_RerankCommon):
    model: str | None = None
    documents: list[DocumentIn]
    return_documents: bool = True


class TeiRequest(_RerankCommon):
    texts: list[DocumentIn]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = True
    truncation_direction: str = "right"


class Passage(BaseModel):
    id: str = Field(min_length=1)
    text: str


class PassagesRequest(BaseModel):
    passages: list[Passage]
    ratio: int | None = Field(default=None, ge=1)


# ---------------------------------------------------------------------------------------------- the service
class Service:
    """One engine, its batcher and passage cache, and the request logic every route shares.

    Args:
      engine: the inference engine (only the batcher's thread calls it once `start` ran).
      config: the server's settings (kalm_jax/configs/serve.py).
      model_name: the name responses report.
    """

    def __init__(self, engine: InferenceEngine, config, model_name: str = "kalm-reranker"):
        self.engine = engine
        self.config = config
        self.model_name = model_name
        self.ratio = mep.check_ratio(config.ratio)
        self.instruction = config.instruction or None
        self.system = config.system or None
        self.api_key = config.api_key or os.environ.get(API_KEY_ENV, "") or None
        self.cache = PassageCache(config.device_cache_bytes, config.host_cache_bytes, config.store_dir or None)
        self.metrics = Metrics(self)
        self.batcher = Batcher(
            engine,
            self.cache,
            self.metrics,
            max_batch_tokens=config.max_batch_tokens,
            max_batch_rows=config.max_batch_rows,
            max_wait_ms=config.max_wait_ms,
        )
        self.ready = threading.Event()
        self.in_flight = 0
        self._requests = itertools.count()

    @classmethod
    def from_config(cls, config) -> Service:
        """Loads `config.checkpoint` (kalm_jax.checkpoints.loader) and builds the engine over all local devices."""
        from kalm_jax.checkpoints import loader
        from kalm_jax.inference.reranker import default_dtype

        if not config.checkpoint:
            raise ValueError("config.checkpoint is required")
        _, model, tok = loader.load(
            config.checkpoint, dtype=config.dtype or default_dtype(), tokenizer=config.tokenizer or None
        )
        engine = InferenceEngine(
            model,
            tok,
            max_document_tokens=config.max_document_tokens,
            max_query_tokens=config.max_query_tokens,
            show_progress=False,
            quantization=config.quantization or None,
            device_states=config.device_states,
        )
        return cls(engine, config, config.model_name or Path(str(config.checkpoint)).resolve().name)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Starts the engine thread; /health answers 200 once the warm-up (if configured) is done."""
        self.batcher.start()
        if not self.config.warmup:
            self.ready.set()
            return

        def warm():
            try:
                tokens = self.engine.document_ids([WARMUP_TEXT], warn=False)[0]
                row = self.batcher.submit([(self.batcher.encode_key(tokens, self.ratio), tokens)], -1)[0].result()
                prompt = self.engine.prompt_ids(WARMUP_TEXT, self.instruction, self.system, warn=False)
                key = self.batcher.score_key(prompt, row, self.ratio)
                self.batcher.submit([(key, ScoreItem(prompt, row))], -1)[0].result()
                log.info("warm-up done: %d programs compiled", self.engine.compiles)
            except Exception:  # noqa: BLE001 - a failed warm-up leaves /health at 503, logged
                log.exception("warm-up failed")
                return
            self.ready.set()

        threading.Thread(target=warm, name="kalm-warmup", daemon=True).start()

    def stop(self, timeout: float | None = None) -> None:
        self.batcher.stop(timeout)

    # ------------------------------------------------------------------ request plumbing
    @contextlib.contextmanager
    def slot(self):
        """A concurrency slot for one request (429 beyond ``max_concurrent_requests``)."""
        if not self.ready.is_set():
            raise ApiError(503, "the model is warming up; retry when /health answers 200", "unhealthy")
        if self.in_flight >= self.config.max_concurrent_requests:
            raise ApiError(429, f"{self.in_flight} requests in flight (max_concurrent_requests)", "overloaded")
        self.in_flight += 1
        try:
            yield next(self._requests)
        finally:
            self.in_flight -= 1

    async def wait(self, futures, request: Request | None) -> list:
        """Results of `futures`; if the client disconnects first, they are cancelled (the batcher drops
        them) and the request ends."""
        gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        if request is None:
            return await gathered
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise
        finally:
            watcher.cancel()
        if gathered in done:
            return gathered.result()
        for f in futures:
            f.cancel()
        gathered.cancel()
        raise ApiError(499, "client closed the request", "cancelled")

    def _check_count(self, n: int, field: str) -> None:
        if n == 0:
            raise ApiError(400, f"{field} is empty", "empty")
        if n > self.config.max_client_batch_size:
            raise ApiError(
                422,
                f"{field}: {n} items, more than max_client_batch_size={self.config.max_client_batch_size}",
                "validation",
            )

    def _ratio(self, ratio: int | None) -> int:
        return self.ratio if ratio is None else mep.check_ratio(ratio)

    async def encode(self, texts: list[str], ratio: int, request_id: int, request, cut: int | None = None):
        """One `PassageStates` row per text at `ratio` (through the batcher)."""
        tokens = await asyncio.to_thread(self.engine.document_ids, texts, warn=False)
        if cut is not None:
            tokens = [t[:cut] for t in tokens]
        futures = self.batcher.submit([(self.batcher.encode_key(t, ratio), t) for t in tokens], request_id)
        rows = await self.wait(futures, request)
        return rows, sum(len(t) for t in tokens)

    async def rerank(
        self,
        query: str,
        documents: list[DocumentIn],
        *,
        field: str,
        instruction: str | None,
        ratio: int | None,
        request: Request | None,
        cut: int | None = None,
    ) -> tuple[np.ndarray, list[str], int]:
        """fp32 margins [D] of `documents` for `query`, the documents' texts and the tokens read."""
        self._check_count(len(documents), field)
        ratio = self._ratio(ratio)
        with self.slot() as request_id:
            instruction = self.instruction if instruction is None else instruction
            prompt = await asyncio.to_thread(self.engine.prompt_ids, query, instruction, self.system, warn=False)
            texts: list[str] = []
            states: list[PassageStates | None] = []
            entries: list[Any] = []
            inline: dict[str, list[int]] = {}
            wanted = [d.id for d in documents if isinstance(d, Document) and d.id is not None]
            found = await asyncio.to_thread(self._lookup, wanted) if wanted else {}
            unknown = [x for x in dict.fromkeys(wanted) if found[x] is None]
            for i, d in enumerate(documents):
                if isinstance(d, Document) and d.id is not None:
                    if found[d.id] is None:
                        texts.append("")
                        states.append(None)
                        entries.append(None)
                        continue
                    entry, st = found[d.id]
                    if ratio % entry.ratio:
                        raise ApiError(
                            422,
                            f"{field}[{i}]: passage {d.id!r} is registered at ratio {entry.ratio}; ratio "
                            f"{ratio} is not a multiple of it",
                            "validation",
                        )
                    texts.append(entry.text)
                    states.append(st)
                    entries.append(entry)
                else:
                    text = d if isinstance(d, str) else d.text
                    inline.setdefault(text, []).append(i)
                    texts.append(text)
                    states.append(None)
                    entries.append(None)
            if unknown:
                raise ApiError(404, f"unknown passage ids: {', '.join(map(repr, unknown))}", "not_found")
            tokens = len(prompt)
            if inline:
                rows, n = await self.encode(list(inline), ratio, request_id, request, cut)
                tokens += n
                for row, where in zip(rows, inline.values()):
                    for i in where:
                        states[i] = row
            items = [
                (self.batcher.score_key(prompt, st, ratio), ScoreItem(prompt, st, entry))
                for st, entry in zip(states, entries)
            ]
            margins = np.asarray(await self.wait(self.batcher.submit(items, request_id), request), np.float32)
        if not np.isfinite(margins).all():
            bad = np.flatnonzero(~np.isfinite(margins))
            raise ApiError(500, f"non-finite scores for documents {bad[:5].tolist()}; none returned", "backend")
        return margins, texts, tokens

    def _lookup(self, ids: list[str]) -> dict[str, Any]:
        """id -> (entry, states), or None for an unknown id (one thread hop for a request's ids)."""
        out: dict[str, Any] = {}
        for x in ids:
            if x not in out:
                try:
                    out[x] = self.cache.get(x)
                except KeyError:
                    out[x] = None
        return out

    async def register(self, body: PassagesRequest, request: Request | None) -> dict[str, Any]:
        self._check_count(len(body.passages), "passages")
        seen: set[str] = set()
        for i, p in enumerate(body.passages):
            if p.id in seen:
                raise ApiError(422, f"passages[{i}].id: {p.id!r} appears more than once", "validation")
            seen.add(p.id)
        ratio = self._ratio(body.ratio)
        with self.slot() as request_id:
            rows, _ = await self.encode([p.text for p in body.passages], ratio, request_id, request)
            out = []
            for p, row in zip(body.passages, rows):
                entry = self.cache.put(p.id, p.text, row)
                out.append({"id": p.id, "windows": entry.windows, "tier": self.cache.tier(p.id)})
        return {"ratio": ratio, "passages": out}


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _order(margins: np.ndarray, top_n: int | None) -> np.ndarray:
    """Best first; ties by index (as `Reranker.rank`)."""
    return np.lexsort((np.arange(len(margins)), -margins))[:top_n]


# ---------------------------------------------------------------------------------------------- middleware
class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes (by Content-Length, or counted as it arrives)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = error_response(413, f"request body over the payload limit of {self.limit} bytes", "payload_limit")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig
            return message

        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooBig:
            if not started:
                await too_big(scope, receive, send)


class _TooBig(Exception):
    pass


# ---------------------------------------------------------------------------------------------- the app
def create_app(service: Service, *, manage_service: bool = True) -> FastAPI:
    """The FastAPI app over `service`; with `manage_service` its lifespan starts and stops the service."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_service:
            service.start()
        yield
        if manage_service:
            await asyncio.to_thread(service.stop, service.config.drain_timeout)

    app = FastAPI(title="kalm-jax rerank server", lifespan=lifespan)
    m = service.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        parts: dict[str, str] = {}
        for e in exc.errors():
            # the field's path, without the names pydantic gives the members of a union (str, Document)
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            loc = [x for i, x in enumerate(loc) if i == 0 or x.isdigit() or not loc[i - 1].isdigit()]
            parts.setdefault(".".join(loc) or "body", e.get("msg", "invalid"))
        message = "; ".join(f"{k}: {v}" for k, v in list(parts.items())[:5])
        return error_response(422, message, "validation")

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return error_response(500, f"{type(exc).__name__}: {exc}", "backend")

    @app.middleware("http")
    async def _timing(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.url.path if request.url.path in ROUTES else "other"
        m.requests.labels(route, str(response.status_code)).inc()
        m.duration.labels(route).observe(time.perf_counter() - start)
        return response

    def auth(request: Request) -> None:
        if service.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {service.api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "unauthorized")

    guarded = [Depends(auth)]

    @app.get("/health")
    async def health():
        if not service.ready.is_set():
            return error_response(503, "warming up", "unhealthy")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v2/rerank", dependencies=guarded)
    async def cohere(body: CohereRequest, request: Request):
        margins, _, _ = await service.rerank(
            body.query,
            body.documents,
            field="documents",
            instruction=body.instruction,
            ratio=body.ratio,
            request=request,
            cut=body.max_tokens_per_doc,
        )
        probs = probability(margins)
        results = [{"index": int(i), "relevance_score": float(probs[i])} for i in _order(margins, body.top_n)]
        return {
            "id": str(uuid.uuid4()),
            "results": results,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
        }

    @app.post("/v1/rerank", dependencies=guarded)
    async def jina(body: JinaRequest, request: Request):
        margins, texts, tokens = await service.rerank(
            body.query,
            body.documents,
            field="documents",
            instruction=body.instruction,
            ratio=body.ratio,
            request=request,
        )
        probs = probability(margins)
        results = []
        for i in _order(margins, body.top_n):
            row: dict[str, Any] = {"index": int(i), "relevance_score": float(probs[i])}
            if body.return_documents:
                row["document"] = {"text": texts[i]}
            results.append(row)
        return {"model": body.model or service.model_name, "usage": {"total_tokens": tokens}, "results": results}

    @app.post("/rerank", dependencies=guarded)
    async def tei(body: TeiRequest, request: Request):
        if body.truncation_direction.lower() != "right":
            raise ApiError(
                422,
                f"truncation_direction: {body.truncation_direction!r} is not supported (only 'right')",
                "validation",
            )
        if not body.truncate:
            limit = service.engine.max_document_tokens
            lengths = await asyncio.to_thread(_lengths, service.engine, body.texts)
            long = [i for i, n in enumerate(lengths) if n > limit]
            if long:
                raise ApiError(
                    413,
                    f"texts[{long[0]}]: {lengths[long[0]]} tokens, more than max_document_tokens={limit} "
                    "(truncate=false)",
                    "validation",
                )
        margins, texts, _ = await service.rerank(
            body.query, body.texts, field="texts", instruction=body.instruction, ratio=body.ratio, request=request
        )
        scores = margins if body.raw_scores else probability(margins)
        out = []
        for i in _order(margins, body.top_n):
            row: dict[str, Any] = {"index": int(i), "score": float(scores[i])}
            if body.return_text:
                row["text"] = texts[i]
            out.append(row)
        return out

    @app.post("/v1/passages", dependencies=guarded)
    async def register(body: PassagesRequest, request: Request):
        return await service.register(body, request)

    @app.get("/v1/passages/{passage_id}", dependencies=guarded)
    async def describe(passage_id: str):
        tier = service.cache.tier(passage_id)
        if tier is None:
            raise ApiError(404, f"unknown passage id {passage_id!r}", "not_found")
        entry, _ = service.cache.get(passage_id)
        return {"id": passage_id, "ratio": entry.ratio, "windows": entry.windows, "tier": tier}

    @app.delete("/v1/passages/{passage_id}", dependencies=guarded)
    async def delete(passage_id: str):
        if not service.cache.delete(passage_id):
            raise ApiError(404, f"unknown passage id {passage_id!r}", "not_found")
        return {"id": passage_id, "deleted": True}

    app.add_middleware(BodyLimit, limit=service.config.payload_limit)
    return app


ROUTES = ("/v2/rerank", "/v1/rerank", "/rerank", "/v1/passages", "/health", "/metrics")


def _lengths(engine: InferenceEngine, documents) -> list[int]:
    """Untruncated encoder lengths of the inline documents (0 for ids)."""
    texts = [d if isinstance(d, str) else (d.text if d.text is not None else "") for d in documents]
    ids = engine.tokenizer.encode_batch([prompts.document_text(t) for t in texts])
    return [len(x) if isinstance(d, str) or d.text is not None else 0 for x, d in zip(ids, documents)]


__all__ = ["Service", "create_app", "ApiError", "API_KEY_ENV", "BodyLimit"]
