"""A bounded load test of the rerank server on loopback, beside the engine's own throughput on the same pairs.

    python -m kalm_jax.serve.loadtest --config.checkpoint=CKPT --config.data_dir=DATA --config.output=OUT.md

Starts ``python -m kalm_jax.serve`` on a free loopback port, registers `corpus_size` documents of the dataset by
id, then per scenario runs `clients` asyncio clients (httpx) for `warmup` + `duration` seconds, each sending
``POST /rerank`` with a random query and `docs_per_request` random documents, inline texts (``inline``) or
registered ids (``ids``), back to back. It records latency (p50/p99), errors, pairs per second and the server's
resident memory (VmRSS, sampled every second), then stops the server with SIGTERM and measures the engine alone
(`InferenceEngine` in this process, one device like the server) on the same number of pairs drawn the same way:
``inline`` encodes every request's documents and scores them, ``ids`` scores from states placed on the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kalm_jax import cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _data(config) -> tuple[list[str], list[str]]:
    from kalm_jax.data.beir import load_corpus, load_queries, passage_text

    root = Path(config.data_dir) / config.dataset
    corpus = load_corpus(next(root.glob("corpus.jsonl*")))
    docs = [passage_text(d)[: config.max_document_chars] for d in list(corpus.values())[: config.corpus_size]]
    queries = list(load_queries(next(root.glob("queries.jsonl*"))).values())[:500]
    return docs, queries


async def _clients(url: str, config, docs, queries, scenario: str, seconds: float, pid: int) -> dict:
    import httpx

    rng = np.random.default_rng(config.seed)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    rss: list[float] = []
    pairs = 0
    stop = time.perf_counter() + seconds

    async def one(client: httpx.AsyncClient, seed: int) -> None:
        nonlocal pairs
        r = np.random.default_rng(seed)
        while time.perf_counter() < stop:
            picks = r.choice(len(docs), config.docs_per_request, replace=False)
            texts = [{"id": f"d{i}"} for i in picks] if scenario == "ids" else [docs[i] for i in picks]
            body = {"query": queries[int(r.integers(len(queries)))], "texts": texts, "ratio": config.ratio}
            t = time.perf_counter()
            try:
                resp = await client.post(f"{url}/rerank", json=body)
                ok = resp.status_code == 200 and len(resp.json()) == len(texts)
                key = "ok" if ok else str(resp.status_code)
            except httpx.HTTPError as e:
                key = type(e).__name__
            if key == "ok":
                latencies.append(time.perf_counter() - t)
                pairs += len(texts)
            else:
                errors[key] = errors.get(key, 0) + 1

    async def sample() -> None:
        while time.perf_counter() < stop:
            rss.append(_rss_mib(pid))
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=config.clients, max_keepalive_connections=config.clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        seeds = rng.integers(0, 2**31, config.clients)
        await asyncio.gather(sample(), *(one(client, int(s)) for s in seeds))
        wall = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "requests": len(latencies),
        "errors": errors,
        "pairs_per_s": pairs / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "rss_mib_first": rss[0] if rss else float("nan"),
        "rss_mib_last": rss[-1] if rss else float("nan"),
        "rss_mib_max": max(rss) if rss else float("nan"),
        "wall_s": wall,
    }


@contextlib.contextmanager
def _server(config):
    import httpx

    port = _free_port()
    args = [a for a in str(config.server_args).split() if a]
    cmd = [sys.executable, "-m", "kalm_jax.serve", f"--config.checkpoint={config.checkpoint}"]
    cmd += [f"--config.port={port}", f"--config.dtype={config.dtype}", f"--config.ratio={config.ratio}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become healthy in 600 s")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def _compiled(url: str) -> float:
    """The server's ``kalm_compiled_programs``."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("kalm_compiled_programs "):
            return float(line.split()[-1])
    raise RuntimeError("the server's /metrics has no kalm_compiled_programs")


def _engine_baseline(config, docs, queries) -> dict[str, float]:
    """Pairs per second of the engine alone on `engine_pairs` pairs drawn like the clients draw them."""
    from kalm_jax.checkpoints import loader
    from kalm_jax.inference.engine import InferenceEngine

    _, model, tok = loader.load(config.checkpoint, dtype=config.dtype)
    engine = InferenceEngine(model, tok, show_progress=False)
    rng = np.random.default_rng(config.seed)
    n_req = max(1, config.engine_pairs // config.docs_per_request)
    picks = np.stack([rng.choice(len(docs), config.docs_per_request, replace=False) for _ in range(n_req)])
    prompts = [engine.prompt_ids(queries[int(rng.integers(len(queries)))], warn=False) for _ in range(n_req)]
    prompt_of = np.repeat(np.arange(n_req), config.docs_per_request)
    flat = picks.reshape(-1)
    out = {}
    for scenario in str(config.scenarios).split(","):
        if scenario == "ids":
            placed = engine.place(engine.encode(docs, config.ratio), show_progress=False)

            def run(placed=placed):
                engine.margins(prompts, prompt_of, placed, flat, show_progress=False)
        else:

            def run():
                states = engine.encode([docs[i] for i in flat], config.ratio)
                engine.margins(prompts, prompt_of, states, np.arange(len(flat)), show_progress=False)

        run()  # compiles
        t = time.perf_counter()
        run()
        out[scenario] = len(flat) / (time.perf_counter() - t)
    return out


def run(config) -> int:
    """The load test (the CLI's body, after parsing)."""
    for field in ("checkpoint", "data_dir"):
        if not config[field]:
            raise cli.ConfigError(f"config.{field} is required")
    import httpx

    docs, queries = _data(config)
    scenarios = [s for s in str(config.scenarios).split(",") if s]
    results: dict[str, dict] = {}
    with _server(config) as (proc, url):
        for start in range(0, len(docs), 128):
            chunk = [{"id": f"d{i}", "text": docs[i]} for i in range(start, min(len(docs), start + 128))]
            r = httpx.post(f"{url}/v1/passages", json={"passages": chunk, "ratio": config.ratio}, timeout=600)
            r.raise_for_status()
        for scenario in scenarios:
            asyncio.run(_clients(url, config, docs, queries, scenario, config.warmup, proc.pid))
            before = _compiled(url)
            results[scenario] = asyncio.run(_clients(url, config, docs, queries, scenario, config.duration, proc.pid))
            results[scenario]["compiles"] = _compiled(url) - before
            print(scenario, json.dumps(results[scenario]), flush=True)
        compiled = _compiled(url)
    baseline = _engine_baseline(config, docs, queries)
    rows = [
        "| scenario | clients | requests | errors | p50 ms | p99 ms | server pairs/s | engine pairs/s | server/engine "
        "| RSS MiB first / last / max | compiles while measured |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for s, r in results.items():
        rows.append(
            f"| {s} (r = {config.ratio}) | {config.clients} | {r['requests']} | {sum(r['errors'].values())} "
            f"{r['errors'] or ''} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['pairs_per_s']:.0f} | "
            f"{baseline[s]:.0f} | {r['pairs_per_s'] / baseline[s]:.2f} | {r['rss_mib_first']:.0f} / "
            f"{r['rss_mib_last']:.0f} / {r['rss_mib_max']:.0f} | {r['compiles']:.0f} |"
        )
    if "ids" in results and "inline" in results:
        rows.append("")
        rows.append(
            f"ids / inline pairs/s: server {results['ids']['pairs_per_s'] / results['inline']['pairs_per_s']:.2f}x, "
            f"engine {baseline['ids'] / baseline['inline']:.2f}x; programs compiled by the server: {compiled}"
        )
    table = "\n".join(rows)
    print(table)
    if config.output:
        out = Path(config.output)
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(
            json.dumps({"results": results, "engine": baseline, "compiled": compiled}, indent=1)
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, "serve_load.py", argv=argv, errors=(FileNotFoundError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
