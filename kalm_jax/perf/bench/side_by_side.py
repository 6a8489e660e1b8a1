"""kalm-jax beside the PyTorch `transformers` peer on the same weights, timed in interleaved rounds.

`kalm-bench --config=bench.py:side_by_side ...` (docs/performance.md). One preset, one (n, r): the
peer (`bench.peer`, the released pipeline) is built with random weights, saved with `save_pretrained`
and loaded into kalm-jax with `kalm_jax.checkpoints.hf.load`, so both sides hold identical weights. Each round times
kalm-jax encode, peer encode, kalm-jax score, peer score (`repeats` calls each, median) one after the
other, so a load change on a shared machine hits both sides alike; the row reports the median over rounds
of the per-round figures and of the per-round speedups. Margins and pooled states of the two sides are
compared on the same inputs (the peer scores kalm-jax's pooled states, so only the decoder differs).
kalm-jax runs through the inference engine (`InferenceEngine.encode_batch` / `score_batch`) and, with
`array_level=True`, also through the array-level functions (`scoring.encode_passages` / `scoring.score`),
timed in the same rounds. `check` compares the rows' speedups with minimums (the `side_by_side_check` preset).

Every round also times one matmul on each side, the shape of the encoder's MLP gate for this batch
([candidates x n, H] @ [H, I], the dtype of the run): the "host" row, whose speedup is XLA's matmul over
torch's on this machine. The two libraries' matmul kernels do not rank alike on every CPU, and the encode
ratio follows them from host to host (benchmarks/2026-12-04-side-by-side-cpu-host-matmul.md), so the row
tells a host's effect from a change in the code.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from kalm_jax.perf import flops
from kalm_jax.perf.bench import peer as peer_lib
from kalm_jax.perf.bench.timing import time_calls

PATH_IMPL = {
    "engine": "kalm_jax InferenceEngine",
    "array-level": "kalm_jax scoring.encode_passages / scoring.score",
}


def run(
    name: str,
    *,
    n: int = 512,
    r: int = 4,
    candidates: int = 16,
    prompt_len: int = 64,
    dtype: str = "float32",
    rounds: int = 5,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    array_level: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Rows of kind "side_by_side" (op "encode" and "score"; `path` "engine", and "array-level" too with
    `array_level`) for preset `name` on this host's CPU.

    Encode: `candidates` passages of n tokens, pooled at r (tokens/s). Score: `candidates` pairs of a
    `prompt_len`-token prompt against the pooled states (pairs/s).
    """
    import torch

    from kalm_jax.checkpoints import hf
    from kalm_jax.inference import scoring
    from kalm_jax.perf.bench.suite import engine_for, token_ids

    progress(f"side by side: building {name} (peer, then the same weights in kalm-jax)")
    peer = peer_lib.build(name, "cpu", dtype, seed)
    with tempfile.TemporaryDirectory(prefix="kalm_side_by_side_") as d:
        peer.model.save_pretrained(d)
        cfg, model = hf.load(d, dtype=dtype, progress=False)
    rng = np.random.default_rng(seed)
    yes_id, no_id = int(rng.integers(3, 1000)), int(rng.integers(1000, 2000))
    engine = engine_for(model, yes_id, no_id)
    ids = token_ids(rng, cfg, (candidates, n))
    mask = np.ones_like(ids)
    dec = token_ids(rng, cfg, (candidates, prompt_len))
    dmask = np.ones_like(dec)
    t = lambda a: torch.as_tensor(np.array(a), dtype=torch.long)  # noqa: E731
    peer_encode = peer_lib.encode_fn(peer, r)
    peer_score = peer_lib.score_fn(peer, yes_id, no_id)

    def ours_enc():
        return engine.encode_batch(ids, mask, r)

    def peer_enc():
        return peer_encode(t(ids), t(mask))

    states, pmask, _ = ours_enc()
    peer_states, peer_pmask = peer_enc()
    states_t = torch.as_tensor(np.array(states)).to(peer.torch_dtype)

    def ours_sc():
        return engine.score_batch(dec, dmask, states, pmask)

    def peer_sc():
        return peer_score(t(dec), t(dmask), states_t, t(pmask))

    def array_enc():
        return scoring.encode_passages(model, ids, mask, r)

    def array_sc():
        return scoring.score(model, dec, dmask, states, pmask, yes_id, no_id)

    ours_margins, peer_margins = ours_sc(), peer_sc().float().numpy()
    ours_mm, peer_mm, mm_shape = _host_matmuls(rng, candidates * n, cfg.hidden_size, cfg.intermediate_size, peer)
    fns = {"ours_encode": ours_enc, "peer_encode": peer_enc, "ours_score": ours_sc, "peer_score": peer_sc}
    if array_level:
        fns = {
            "ours_encode": ours_enc,
            "array_encode": array_enc,
            "peer_encode": peer_enc,
            "ours_score": ours_sc,
            "array_score": array_sc,
            "peer_score": peer_sc,
        }
        array_states, array_margins = array_enc()[0], array_sc()
    fns.update(ours_matmul=ours_mm, peer_matmul=peer_mm)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds):
        progress(f"side by side: round {i + 1}/{rounds}")
        for key, fn in fns.items():
            times[key].append(time_calls(fn, [()], warmup=0, repeats=repeats).median_s)
    peer_lib.release(peer)

    base = {
        "kind": "side_by_side",
        "shape": name,
        "n": n,
        "r": r,
        "dtype": dtype,
        "device": "cpu",
        "rounds": rounds,
        "repeats": repeats,
        "timing": "interleaved rounds (ours, peer alternating)",
        "peer_impl": "transformers T5Gemma2 sdpa (released pipeline)",
    }
    c = flops.cached_states(n, r)
    rows = []
    paths = [("engine", "ours", states, ours_margins)]
    if array_level:
        paths.append(("array-level", "array", array_states, array_margins))
    for (path, key, our_states, our_margins), (op, unit, amount) in itertools.product(
        paths, (("encode", "tokens_per_s", candidates * n), ("score", "pairs_per_s", candidates))
    ):
        row = {
            **base,
            "path": path,
            "ours_impl": PATH_IMPL[path],
            "op": op,
            "batch": candidates,
            **_round_fields(times[f"{key}_{op}"], times[f"peer_{op}"], unit, amount),
        }
        if op == "encode":
            row["max_abs_state_diff"] = float(np.max(np.abs(peer_states.float().numpy() - our_states)))
            row["flops_per_passage"] = flops.encoder_flops(cfg, n)
        else:
            row.update(
                prompt_len=prompt_len,
                cached_states=c,
                max_abs_margin_diff=float(np.max(np.abs(peer_margins - our_margins))),
                flops_per_pair=flops.decoder_flops(cfg, prompt_len, c),
            )
        rows.append(row)
    m, k, cols = mm_shape
    rows.append(
        {
            **base,
            "path": "host",
            "ours_impl": "jax.numpy.matmul (jitted)",
            "peer_impl": "torch.matmul",
            "op": "matmul",
            "batch": candidates,
            "matmul_shape": [m, k, cols],
            **_round_fields(times["ours_matmul"], times["peer_matmul"], "gflops_per_s", 2 * m * k * cols / 1e9),
        }
    )
    return rows


def _round_fields(ours_s: list[float], peer_s: list[float], unit: str, amount: float) -> dict[str, Any]:
    """A row's timing fields from the per-round seconds of each side: `amount` per median second as
    ours_/peer_`unit`, the medians, the median / min / max of the per-round speedups, the rounds."""
    speedups = [p / o for o, p in zip(ours_s, peer_s)]
    return {
        f"ours_{unit}": amount / statistics.median(ours_s),
        f"peer_{unit}": amount / statistics.median(peer_s),
        "ours_median_s": statistics.median(ours_s),
        "peer_median_s": statistics.median(peer_s),
        "speedup": statistics.median(speedups),
        "speedup_min": min(speedups),
        "speedup_max": max(speedups),
        "ours_round_s": ours_s,
        "peer_round_s": peer_s,
    }


def _host_matmuls(rng, m: int, k: int, cols: int, peer) -> tuple[Callable, Callable, tuple[int, int, int]]:
    """(XLA's call, torch's call, shape) of one [m, k] @ [k, cols] matmul in the peer's dtype, same inputs."""
    import jax
    import jax.numpy as jnp
    import torch

    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, cols), dtype=np.float32) / np.sqrt(k)
    ta, tb = torch.from_numpy(a).to(peer.torch_dtype), torch.from_numpy(b).to(peer.torch_dtype)
    dtype = jnp.dtype(str(peer.torch_dtype).removeprefix("torch."))
    ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    matmul = jax.jit(jnp.matmul)
    return (lambda: matmul(ja, jb)), (lambda: torch.matmul(ta, tb)), (m, k, cols)


def host_note(rows: list[dict[str, Any]]) -> str | None:
    """One line on the host row (None without one): XLA's matmul over torch's on this machine."""
    host = [r for r in rows if r.get("kind") == "side_by_side" and r.get("op") == "matmul"]
    if not host:
        return None
    r = host[0]
    m, k, cols = r["matmul_shape"]
    return (
        f"host: XLA's {r['dtype']} matmul [{m}, {k}] @ [{k}, {cols}] runs at {r['speedup']:.2f}x torch's "
        f"({r['ours_gflops_per_s']:,.0f} vs {r['peer_gflops_per_s']:,.0f} GFLOP/s): the speedups are this host's"
    )


def check(rows: list[dict[str, Any]], min_speedup: dict[str, float]) -> list[str]:
    """One line per side-by-side row whose median speedup over the peer is below `min_speedup[row op]`
    (op "encode" / "score"; an op not named is not checked); empty when every row meets its minimum.
    Raises ValueError when `rows` hold no side-by-side row of a checked op (nothing was measured)."""
    rows = [r for r in rows if r.get("kind") == "side_by_side" and r.get("op") in min_speedup]
    if not rows:
        raise ValueError(f"no side-by-side rows of ops {sorted(min_speedup)} to check")
    failures = []
    for r in rows:
        want = float(min_speedup[r["op"]])
        if not r["speedup"] >= want:
            failures.append(
                f"{r['op']} through the {r.get('path', 'engine')} is {r['speedup']:.2f}x the peer "
                f"(rounds {r['speedup_min']:.2f}-{r['speedup_max']:.2f}), below {want:g}x"
            )
    return failures


__all__ = ["run", "check", "host_note", "PATH_IMPL"]
