"""Quantized weights beside float ones on this host, timed in interleaved rounds (`kalm-bench
--config=bench.py:quantized`).

One preset, one (n, r), random weights: one inference engine over the float model and one per quantization mode
(`InferenceEngine(model, quantization=mode)`, `kalm_jax.model.quantization`), all on the same inputs. Each round
times, for every engine in turn, encode (`encode_batch`: `candidates` passages of n tokens pooled at r) and
score (`score_batch`: `candidates` pairs of a `prompt_len`-token prompt over that engine's own pooled states),
`repeats` calls each (median), so a load change on a shared machine hits every mode alike. A row per (mode, op)
reports the median time over rounds and the median, min and max over rounds of the per-round ratio
mode / float (below 1: the quantized program is faster), and for score the largest |margin difference| from
the float engine on the same pairs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from kalm_jax.model.quantization import check_mode
from kalm_jax.perf.bench.timing import time_calls


def run(
    name: str,
    *,
    modes: Sequence[str] = ("int8", "int8-dynamic", "fp8"),
    n: int = 512,
    r: int = 4,
    candidates: int = 16,
    prompt_len: int = 64,
    dtype: str = "float32",
    rounds: int = 5,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Rows of kind "quantized" (op "encode" and "score", one per mode in `modes` and one for the float model,
    "none") for preset `name` on this process's default device."""
    from kalm_jax.inference.engine import InferenceEngine
    from kalm_jax.model.build import build_model
    from kalm_jax.model.config import get_preset, parse_dtype
    from kalm_jax.perf.bench.suite import token_ids

    modes = ["none", *(check_mode(m) for m in modes if m != "none")]
    cfg = get_preset(name)
    progress(f"quantized: building {name} ({dtype}) and one engine per mode {modes}")
    model = build_model(cfg, seed=seed, param_dtype=parse_dtype(dtype), dtype=parse_dtype(dtype))
    rng = np.random.default_rng(seed)
    yes_id, no_id = int(rng.integers(3, 1000)), int(rng.integers(1000, 2000))
    engines = {
        m: InferenceEngine(model, None, yes_id=yes_id, no_id=no_id, show_progress=False, quantization=m) for m in modes
    }
    ids = token_ids(rng, cfg, (candidates, n))
    mask = np.ones_like(ids)
    dec = token_ids(rng, cfg, (candidates, prompt_len))
    dmask = np.ones_like(dec)
    states = {m: e.encode_batch(ids, mask, r) for m, e in engines.items()}  # also compiles
    margins = {m: e.score_batch(dec, dmask, states[m][0], states[m][1]) for m, e in engines.items()}
    fns: dict[tuple[str, str], Callable[[], Any]] = {}
    for m, e in engines.items():
        fns[(m, "encode")] = lambda e=e: e.encode_batch(ids, mask, r)
        fns[(m, "score")] = lambda e=e, s=states[m]: e.score_batch(dec, dmask, s[0], s[1])
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
    for i in range(rounds):
        progress(f"quantized: round {i + 1}/{rounds}")
        for key, fn in fns.items():
            times[key].append(time_calls(fn, [()], warmup=0, repeats=repeats).median_s)
    rows = []
    for (m, op), secs in times.items():
        ratios = [t / f for t, f in zip(secs, times[("none", op)])]
        amount, unit = (candidates * n, "tokens_per_s") if op == "encode" else (candidates, "pairs_per_s")
        row = {
            "kind": "quantized",
            "shape": name,
            "quantization": m,
            "op": op,
            "n": n,
            "r": r,
            "batch": candidates,
            "dtype": dtype,
            "device": jax.local_devices()[0].device_kind,
            "rounds": rounds,
            "repeats": repeats,
            "timing": "interleaved rounds (every mode's encode and score in each round)",
            "median_s": statistics.median(secs),
            unit: amount / statistics.median(secs),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "round_s": secs,
        }
        if op == "score":
            row["prompt_len"] = prompt_len
            row["max_abs_margin_diff"] = float(np.max(np.abs(np.asarray(margins[m]) - np.asarray(margins["none"]))))
        rows.append(row)
    return rows


__all__ = ["run"]
