"""The rerank server (kalm_jax.serve): Cohere, Jina/vLLM and TEI shapes, passages by id, batch-independent
scores, limits and bad input, API key, client disconnects and SIGTERM drain.

In-process tests drive the FastAPI app with its TestClient (httpx) over one `Service` on the tiny Hub-style
checkpoint; the Cohere client, disconnect and SIGTERM tests run a real `python -m kalm_jax.serve` on a free
loopback port. References are `Reranker.rank` / `Reranker.score` on the same checkpoint and token counts from
its tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from child_process import child_env

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from kalm_jax import cli  # noqa: E402
from kalm_jax.inference.engine import probability  # noqa: E402
from kalm_jax.inference.reranker import Reranker  # noqa: E402
from kalm_jax.serve.app import Service, create_app  # noqa: E402
from kalm_jax.serve.cache import PassageCache  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUERY = "stem cells in glioblastoma"


@pytest.fixture(scope="module")
def docs(scifact_texts) -> list[str]:
    return [t[:400] for t in scifact_texts[:12]] + ["short one", "cells"]


@pytest.fixture(scope="module")
def rr(hub_checkpoint) -> Reranker:
    return Reranker.from_pretrained(hub_checkpoint[0], dtype="float32")


def _config(checkpoint, **overrides):
    config = cli.load_file(cli.config_file("serve.py"))
    config.checkpoint = str(checkpoint)
    config.dtype = "float32"
    for k, v in overrides.items():
        config[k] = v
    return config


@pytest.fixture(scope="module")
def service(hub_checkpoint):
    os.environ.pop("KALM_API_KEY", None)
    svc = Service.from_config(_config(hub_checkpoint[0], max_wait_ms=2.0, max_batch_rows=8))
    with TestClient(create_app(svc)) as client:
        deadline = time.monotonic() + 300
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "warm-up did not finish"
            time.sleep(0.1)
        svc.client = client
        yield svc


@pytest.fixture
def client(service):
    yield service.client
    service.api_key = None
    service.batcher.max_wait = 0.002
    service.batcher.max_batch_rows = 8
    service.config.max_concurrent_requests = 512


def _fresh_cache(service, **kwargs) -> PassageCache:
    """Gives the service a new passage cache (the budgets under test)."""
    cache = PassageCache(kwargs.get("device_bytes", 2**30), kwargs.get("host_bytes", 2**30), kwargs.get("store_dir"))
    service.cache = service.batcher.cache = cache
    return cache


# ---------------------------------------------------------------------------------------------- shapes
def test_tei_shape_field_by_field(client, rr, docs):
    margins = rr.score(QUERY, docs, return_margin=True)
    raw = client.post("/rerank", json={"query": QUERY, "texts": docs, "raw_scores": True, "return_text": True})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert isinstance(body, list) and len(body) == len(docs)
    assert all(set(row) == {"index", "score", "text"} for row in body)
    assert [row["index"] for row in body] == [r["corpus_id"] for r in rr.rank(QUERY, docs)]
    assert [row["text"] for row in body] == [docs[row["index"]] for row in body]
    got = np.array([row["score"] for row in body])
    np.testing.assert_allclose(got, margins[[row["index"] for row in body]], rtol=0, atol=2e-6)
    assert all(a >= b for a, b in zip(got, got[1:]))
    prob = client.post("/rerank", json={"query": QUERY, "texts": docs, "top_n": 3}).json()
    assert [set(row) for row in prob] == [{"index", "score"}] * 3
    np.testing.assert_allclose([r["score"] for r in prob], probability(got[:3]), rtol=0, atol=1e-6)


def test_jina_shape_field_by_field(client, rr, docs):
    r = client.post("/v1/rerank", json={"model": "m", "query": QUERY, "documents": docs[:5], "top_n": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "usage", "results"} and body["model"] == "m"
    prompt = rr.engine.prompt_ids(QUERY)
    doc_tokens = sum(len(x) for x in rr.engine.document_ids(docs[:5]))
    assert body["usage"] == {"total_tokens": len(prompt) + doc_tokens}
    ref = rr.rank(QUERY, docs[:5], top_k=4)
    assert [x["index"] for x in body["results"]] == [x["corpus_id"] for x in ref]
    for row, want in zip(body["results"], ref):
        assert set(row) == {"index", "relevance_score", "document"}
        assert row["document"] == {"text": docs[row["index"]]}
        assert abs(row["relevance_score"] - want["score"]) <= 1e-6
    bare = client.post(
        "/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in docs[:3]], "return_documents": False}
    )
    assert [set(x) for x in bare.json()["results"]] == [{"index", "relevance_score"}] * 3
    assert bare.json()["model"] == "KaLM-Reranker-V1-Tiny"  # the checkpoint folder's name


def test_instruction_and_ratio_per_request(client, rr, docs):
    instruction = "Judge whether the passage mentions cells."
    for ratio in (1, 8):
        r = client.post(
            "/rerank",
            json={"query": QUERY, "texts": docs[:4], "raw_scores": True, "instruction": instruction, "ratio": ratio},
        )
        got = {row["index"]: row["score"] for row in r.json()}
        ref = Reranker(rr.model, rr.tokenizer, ratio=ratio).score(QUERY, docs[:4], instruction, return_margin=True)
        np.testing.assert_allclose([got[i] for i in range(4)], ref, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------------- passages by id
@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_ids_score_as_the_same_texts_inline_at_r_and_4r(client, service, docs, tier, tmp_path):
    budgets = {"device": {}, "host": {"device_bytes": 0}, "disk": {"device_bytes": 0, "host_bytes": 0}}[tier]
    _fresh_cache(service, store_dir=tmp_path / "store", **budgets)
    r = client.post(
        "/v1/passages", json={"passages": [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)], "ratio": 2}
    )
    assert r.status_code == 200, r.text
    assert {p["tier"] for p in r.json()["passages"]} == {tier}
    if tier == "disk":
        assert len(list((tmp_path / "store").iterdir())) == len(docs)
    mixed = [{"id": f"d{i}"} if i % 2 else docs[i] for i in range(len(docs))]
    for ratio in (2, 8):
        by_id = client.post("/rerank", json={"query": QUERY, "texts": mixed, "raw_scores": True, "ratio": ratio})
        inline = client.post("/rerank", json={"query": QUERY, "texts": docs, "raw_scores": True, "ratio": ratio})
        a = {x["index"]: x["score"] for x in by_id.json()}
        b = {x["index"]: x["score"] for x in inline.json()}
        if ratio == 2:  # the same states, the same shapes: bit for bit
            assert a == b
        else:  # states registered at 2 re-pooled to 8 vs texts encoded at 8: fp32 summation order only
            np.testing.assert_allclose([a[i] for i in range(len(docs))], [b[i] for i in range(len(docs))], atol=2e-6)
            assert all(a[i] == b[i] for i in range(0, len(docs), 2))  # the inline ones are identical
    stats = client.get("/metrics").text
    assert f'kalm_cache_hits_total{{tier="{tier}"}}' in stats


def test_replacing_an_id_is_atomic_and_deleting_it_makes_it_unknown(client, service, docs):
    _fresh_cache(service)
    client.post("/v1/passages", json={"passages": [{"id": "x", "text": docs[0]}]})
    before = client.post("/rerank", json={"query": QUERY, "texts": [{"id": "x"}], "raw_scores": True}).json()[0]
    client.post("/v1/passages", json={"passages": [{"id": "x", "text": docs[1]}]})
    after = client.post("/rerank", json={"query": QUERY, "texts": [{"id": "x"}, docs[1], docs[0]], "raw_scores": True})
    s = {x["index"]: x["score"] for x in after.json()}
    assert s[0] == s[1] and s[2] == before["score"] and s[0] != before["score"]
    assert client.get("/v1/passages/x").json()["tier"] == "device"
    assert client.delete("/v1/passages/x").status_code == 200
    missing = client.post("/v1/rerank", json={"query": QUERY, "documents": ["a", {"id": "x"}, {"id": "y"}]})
    assert missing.status_code == 404 and "'x'" in missing.json()["error"] and "'y'" in missing.json()["error"]
    assert client.delete("/v1/passages/x").status_code == 404


# ---------------------------------------------------------------------------------------------- batching
def test_scores_do_not_depend_on_what_was_batched_with_them_bit_for_bit(client, service, docs):
    # 32-row calls over 8 devices: a call holding one request's 5 pairs and one holding 30 pairs of four
    # requests would be 8 and 32 rows if rows followed the items, and XLA's per-row results differ between them
    service.batcher.max_batch_rows = 32
    alone = {}
    requests = [(QUERY, docs[:5]), ("glioma", docs[3:11]), ("cells", docs[::2]), (QUERY, docs[6:] + docs[:2])]
    for i, (q, d) in enumerate(requests):
        alone[i] = client.post("/rerank", json={"query": q, "texts": d, "raw_scores": True}).json()
    before = _histogram_sum(client, "kalm_batch_requests", "score")
    service.batcher.max_wait = 1.5  # the four requests below share engine calls
    together = {}

    def send(i):
        q, d = requests[i]
        together[i] = client.post("/rerank", json={"query": q, "texts": d, "raw_scores": True}).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = _histogram_sum(client, "kalm_batch_requests", "score")
    assert after[0] - before[0] > after[1] - before[1], "no engine call held pairs of more than one request"
    assert together == alone


def _histogram_sum(client, name: str, kind: str) -> tuple[float, float]:
    """(sum, count) of a histogram on /metrics."""
    text = client.get("/metrics").text
    values = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f'{name}_{part}{{kind="{kind}"}}'):
                values[part] = float(line.split()[-1])
    return values.get("sum", 0.0), values.get("count", 0.0)


def test_random_request_shapes_compile_a_bounded_number_of_programs(client, service, scifact_texts):
    rng = np.random.default_rng(0)
    shapes, start = set(service.batcher.shapes), service.engine.compiles
    prompt_lengths = []
    for _ in range(8):
        texts = [
            scifact_texts[int(j)][: int(rng.integers(5, 600))] for j in rng.integers(0, 3000, int(rng.integers(1, 12)))
        ]
        query = "query words " * int(rng.integers(1, 20))
        prompt_lengths.append(len(service.engine.prompt_ids(query)))
        r = client.post("/rerank", json={"query": query, "texts": texts})
        assert r.status_code == 200, r.text
    new = service.batcher.shapes - shapes
    # keys are buckets: encoder length (128s up to 1024) x prompt length (32s) x windows (powers of two)
    b = service.engine.buckets
    prompt_buckets = len({b.decoder_length(n) for n in range(min(prompt_lengths), max(prompt_lengths) + 1)})
    assert len(new) <= 8 + prompt_buckets * 4, sorted(map(str, new))
    assert service.engine.compiles - start <= len(new)
    assert f"kalm_compiled_programs {float(service.engine.compiles)}" in client.get("/metrics").text


# ---------------------------------------------------------------------------------------------- limits
def test_bad_input_and_limits(client, service, docs):
    too_big = client.post("/rerank", content=b'{"query": "q", "texts": ["' + b"a" * 2_100_000 + b'"]}')
    assert too_big.status_code == 413 and too_big.json()["error_type"] == "payload_limit"
    empty = client.post("/v1/rerank", json={"query": "q", "documents": []})
    assert empty.status_code == 400 and set(empty.json()) >= {"error", "error_type"}
    many = client.post("/rerank", json={"query": "q", "texts": ["x"] * 257})
    assert many.status_code == 422 and "max_client_batch_size=256" in many.json()["error"]
    for body, field in (
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ({"documents": ["a"]}, "query"),
        ({"query": "q", "documents": ["a", 3]}, "documents.1"),
        ({"query": "q", "documents": [{"text": "a", "id": "b"}]}, "documents.0"),
        ({"query": "q", "documents": ["a"], "ratio": 0}, "ratio"),
    ):
        r = client.post("/v1/rerank", json=body)
        assert r.status_code == 422 and r.json()["error"].startswith(field + ":"), (body, r.text)
    dup = client.post("/v1/passages", json={"passages": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]})
    assert dup.status_code == 422 and "passages[1].id" in dup.json()["error"]
    left = client.post("/rerank", json={"query": "q", "texts": ["a"], "truncation_direction": "left"})
    assert left.status_code == 422 and "truncation_direction" in left.json()["error"]
    long = client.post("/rerank", json={"query": "q", "texts": ["word " * 3000], "truncate": False})
    assert long.status_code == 413 and "texts[0]" in long.json()["error"]


def test_too_many_requests_in_flight_is_429(client, service, docs):
    service.config.max_concurrent_requests = 1
    service.batcher.max_wait = 1.0
    first = {}
    t = threading.Thread(
        target=lambda: first.setdefault("r", client.post("/rerank", json={"query": "q", "texts": ["a b c"]}))
    )
    t.start()
    deadline = time.monotonic() + 30
    while service.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = client.post("/rerank", json={"query": "q", "texts": ["a"]})
    t.join(60)
    assert second.status_code == 429 and second.json()["error_type"] == "overloaded"
    assert first["r"].status_code == 200


def test_not_ready_is_503(client, service):
    service.ready.clear()
    try:
        assert client.get("/health").status_code == 503
        assert client.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 503
    finally:
        service.ready.set()
    assert client.get("/health").status_code == 200


def test_non_finite_scores_are_never_returned(client, service, monkeypatch):
    real = service.engine.margins

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0] = np.nan
        return out

    monkeypatch.setattr(service.engine, "margins", poisoned)
    r = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert r.status_code == 500 and "non-finite" in r.json()["error"] and "results" not in r.json()


def test_api_key_guards_the_rerank_routes(client, service):
    service.api_key = "sekret"
    body = {"query": "q", "documents": ["a"]}
    assert client.post("/v1/rerank", json=body).status_code == 401
    assert client.post("/v1/rerank", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/rerank", json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert client.post("/v1/passages", json={"passages": [{"id": "k", "text": "t"}]}).status_code == 401
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


# ---------------------------------------------------------------------------------------------- a real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(checkpoint, *args: str):
    port = _free_port()
    env = child_env(KALM_API_KEY="test-key")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kalm_jax.serve", f"--config.checkpoint={checkpoint}", f"--config.port={port}", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "server did not become healthy"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def server(hub_checkpoint):
    with _server(hub_checkpoint[0], "--config.dtype=float32", "--config.max_wait_ms=3000") as s:
        yield s


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_cohere_client_gets_reranker_rank(server, rr, docs):
    cohere = pytest.importorskip("cohere")
    _, url = server
    client = cohere.ClientV2(base_url=url, api_key="test-key", timeout=120)
    got = client.rerank(model="kalm", query=QUERY, documents=docs, top_n=5)
    ref = rr.rank(QUERY, docs, top_k=5)
    assert [r.index for r in got.results] == [r["corpus_id"] for r in ref]
    np.testing.assert_allclose([r.relevance_score for r in got.results], [r["score"] for r in ref], atol=1e-6)
    assert all(0.0 <= r.relevance_score <= 1.0 for r in got.results)
    wrong = cohere.ClientV2(base_url=url, api_key="not-the-key", timeout=60)
    with pytest.raises(Exception) as err:
        wrong.rerank(model="kalm", query=QUERY, documents=docs[:2])
    assert getattr(err.value, "status_code", None) == 401


def test_a_request_whose_client_goes_away_frees_its_slot(server):
    _, url = server
    port = int(url.rsplit(":", 1)[1])
    encoded = _metric(url, "kalm_documents_encoded_total")
    body = json.dumps({"query": "q", "texts": ["a text nobody waits for"]}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while _metric(url, "kalm_requests_in_flight") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # the connection is closed while the item waits out max_wait_ms (3 s): slot and queue are freed at once
    deadline = time.monotonic() + 2.5
    while _metric(url, "kalm_requests_in_flight") or _metric(url, "kalm_queue_size"):
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)
    time.sleep(3.5)
    assert _metric(url, "kalm_documents_encoded_total") == encoded  # the cancelled item never ran


def test_sigterm_drains_in_flight_requests_and_exits(hub_checkpoint):
    with _server(hub_checkpoint[0], "--config.max_wait_ms=1500") as (proc, url):
        result = {}

        def send():
            result["r"] = httpx.post(
                f"{url}/rerank",
                json={"query": "q", "texts": ["drained"]},
                headers={"Authorization": "Bearer test-key"},
                timeout=60,
            )

        t = threading.Thread(target=send)
        t.start()
        deadline = time.monotonic() + 10
        while _metric(url, "kalm_requests_in_flight") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(60) == 0
        assert result["r"].status_code == 200 and len(result["r"].json()) == 1
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
        log = proc.stdout.read()
        assert "Traceback" not in log, log[-3000:]


def test_int8_states_server_scores_as_the_int8_states_reranker(hub_checkpoint, rr, docs):
    svc = Service.from_config(_config(hub_checkpoint[0], device_states="int8", warmup=False))
    assert svc.engine.device_states == "int8"
    rerank = Reranker(rr.model, rr.tokenizer, device_states="int8")
    assert rerank.engine.device_states == "int8"
    want = rerank.score("cell biology", docs[:4])
    with TestClient(create_app(svc)) as client:
        body = client.post("/v2/rerank", json={"query": "cell biology", "documents": docs[:4]}).json()
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    # the server encodes at other batch shapes: an ulp of difference in an encoder state can move its int8 value
    # by one step (5e-5 in a probability seen), so not the float path's 1e-5
    np.testing.assert_allclose([got[i] for i in range(4)], want, rtol=0, atol=5e-4)
    float_states = Reranker(rr.model, rr.tokenizer).score("cell biology", docs[:4])
    assert np.abs(np.asarray(want) - float_states).max() > 0  # int8 states did change the scores


def test_quantized_server_scores_as_the_quantized_reranker(hub_checkpoint, rr, docs):
    svc = Service.from_config(_config(hub_checkpoint[0], quantization="int8", warmup=False))
    assert svc.engine.quantization == "int8"
    want = Reranker(rr.model, rr.tokenizer, quantization="int8").score("cell biology", docs[:4])
    with TestClient(create_app(svc)) as client:
        body = client.post("/v2/rerank", json={"query": "cell biology", "documents": docs[:4]}).json()
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(4)], want, rtol=1e-5, atol=1e-6)
