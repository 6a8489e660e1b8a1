"""Benchmark rows: encode, score, online-cost ratio and train step of kalm-jax with random weights.

Every row is a plain dict (JSON-ready) with `kind`, `shape` and, where they apply, `n` (passage tokens)
and `r` (MEP ratio), plus the measured figures. Encode and score are timed through the one inference
engine, host token arrays in and host numpy out, the engine's bucketing, padding and transfers included:
encode through `InferenceEngine.encode_batch`; score through `InferenceEngine.margins` over passage states
placed on the devices beforehand (`InferenceEngine.place`, a hot cache, as the peer's GPU tensors are),
with the host-states figure of `InferenceEngine.score_batch` beside it. The first call (which compiles) is
reported apart from run time as `compile_s`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.inference.states import PassageStates
from kalm_jax.model.attention.dispatch import resolve_attention_impl
from kalm_jax.model.build import build_model as build
from kalm_jax.model.config import ModelConfig, get_preset, parse_dtype
from kalm_jax.model.options import ModelOptions
from kalm_jax.perf import flops
from kalm_jax.perf.bench.timing import Timing, device_peak_bytes, time_calls


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to run. Defaults are the issue's grid (meant for a GPU; pass smaller grids on CPU)."""

    shapes: tuple[str, ...] = ("nano", "small", "large")
    encode_lengths: tuple[int, ...] = (256, 512, 1024, 4096)
    score_lengths: tuple[int, ...] = (256, 512, 4096)
    ratios: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    candidates: int = 100  # pairs scored per query
    prompt_len: int = 64  # decoder prompt tokens: system + instruction + a 16-token query (Gemma tokenizer)
    encode_tokens: int = 32768  # passage tokens per encode call (batch = max(1, encode_tokens // n))
    score_batch: int = 100  # pairs per score call; halved automatically when memory runs out
    dtype: str = "bfloat16"
    quantization: str = "none"  # weight mode of the timed engine (kalm_jax.model.quantization.MODES)
    attention_impl: str = "auto"
    warmup: int = 2
    repeats: int = 5
    rotations: int = 3  # distinct input sets cycled through, so no call reuses the last call's buffers
    seed: int = 0
    train: bool = True
    train_n: int = 512
    train_r: int = 4
    train_batch: int = 8


# The previous performance issue's H100 grid (`kalm-bench --config=bench.py:h100`): nano and large,
# n = 512 and 4096, r = 1, 4, 8, one query's 100 candidates per score call, peer rows, no train rows.
# Sized for < 8 minutes on one H100: 2 shapes x (2 encode + 6 score) compiled programs, 1 warm-up and
# 5 timed calls each, 2 input rotations; the peer runs the same 16 cells.
H100 = BenchSettings(
    shapes=("nano", "large"),
    encode_lengths=(512, 4096),
    score_lengths=(512, 4096),
    ratios=(1, 4, 8),
    candidates=100,
    score_batch=100,
    warmup=1,
    repeats=5,
    rotations=2,
    train=False,
)
SUITES: dict[str, BenchSettings] = {"h100": H100}


@dataclasses.dataclass
class ShapeContext:
    """A random-weight model of one preset and the inference engine serving it."""

    name: str
    cfg: ModelConfig
    model: Any
    engine: InferenceEngine
    impl: str


def engine_for(model, yes_id: int = 5, no_id: int = 6, quantization: str | None = None) -> InferenceEngine:
    """The inference engine the benchmark times: weights placed once on this process's devices (quantized to
    `quantization` when given); no tokenizer (token arrays in), fixed yes/no ids."""
    return InferenceEngine(model, None, yes_id=yes_id, no_id=no_id, show_progress=False, quantization=quantization)


def build_model(name: str, settings: BenchSettings) -> ShapeContext:
    cfg = get_preset(name)
    dtype = parse_dtype(settings.dtype)
    options = ModelOptions(attention_impl=settings.attention_impl)
    model = build(cfg, seed=settings.seed, param_dtype=dtype, dtype=dtype, options=options)
    impl = resolve_attention_impl(settings.attention_impl, dtype, cfg.head_dim)
    return ShapeContext(name, cfg, model, engine_for(model, quantization=settings.quantization), impl)


def _first_call(fn: Callable[..., Any], args: tuple) -> float:
    """Seconds of the first call (compilation + one run), kept out of the timed calls."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def token_ids(rng: np.random.Generator, cfg: ModelConfig, shape) -> np.ndarray:
    # Ordinary text tokens: avoid pad/eos/bos and the image/eoi ids at the top of the vocabulary.
    return rng.integers(3, cfg.boi_token_index, shape, dtype=np.int32)


def _base_row(kind: str, ctx: ShapeContext, settings: BenchSettings) -> dict[str, Any]:
    return {
        "kind": kind,
        "shape": ctx.name,
        "dtype": settings.dtype,
        "quantization": ctx.engine.quantization,
        "attention_impl": ctx.impl,
        "backend": jax.default_backend(),
        "device": jax.local_devices()[0].device_kind,
    }


def _timing_fields(t: Timing) -> dict[str, Any]:
    return {"median_s": t.median_s, "min_s": t.min_s, "max_s": t.max_s, "repeats": t.repeats, "compile_s": t.compile_s}


def _with_oom_halving(batch: int, run: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """Runs `run(batch)`, halving the batch on device out-of-memory (chunks when memory requires)."""
    while True:
        try:
            return run(batch)
        except Exception as err:  # XlaRuntimeError has no stable import path across jax versions
            if not _is_oom(err) or batch == 1:
                raise
            batch //= 2


def encode_row(ctx: ShapeContext, n: int, settings: BenchSettings, peak_flops: float | None) -> dict[str, Any]:
    """Passage encoding (+ MEP at r = 1) of full n-token passages: tokens/s and MFU."""
    rng = np.random.default_rng(settings.seed + n)

    def run(batch: int) -> dict[str, Any]:
        inputs = [
            (token_ids(rng, ctx.cfg, (batch, n)), np.ones((batch, n), np.int32)) for _ in range(settings.rotations)
        ]

        def call(ids, mask):
            return ctx.engine.encode_batch(ids, mask, 1)

        compile_s = _first_call(call, inputs[0])
        timing = time_calls(call, inputs, warmup=settings.warmup, repeats=settings.repeats, compile_s=compile_s)
        tokens_per_s = batch * n / timing.median_s
        achieved = flops.encoder_flops(ctx.cfg, n) * batch / timing.median_s
        return {
            **_base_row("encode", ctx, settings),
            "n": n,
            "r": 1,
            "batch": batch,
            "tokens_per_s": tokens_per_s,
            "s_per_passage": timing.median_s / batch,
            "flops_per_s": achieved,
            "mfu": achieved / peak_flops if peak_flops else None,
            **_timing_fields(timing),
            "peak_bytes": device_peak_bytes(),
            "cache_bytes_per_passage": flops.cache_bytes(ctx.cfg, n, 1, jnp.dtype(settings.dtype).itemsize),
        }

    return _with_oom_halving(max(1, settings.encode_tokens // n), run)


def score_row(ctx: ShapeContext, n: int, r: int, settings: BenchSettings, peak_flops: float | None) -> dict[str, Any]:
    """Scoring of `candidates` (prompt, cached passage) pairs at ratio r: pairs/s and MFU.

    The main figure is what a serving system with a hot cache does (and what the PyTorch peer does, whose
    states are torch tensors on the GPU): per input rotation, the `batch` cached states are placed on the
    devices once (`InferenceEngine.place`, not timed), then one query's candidates are timed through
    `InferenceEngine.margins(prompt, prompt_of = 0, device states, passage_of = arange)`. The same pairs with
    host numpy states through `InferenceEngine.score_batch` (padding + host->device transfer per call) are
    timed the same way and kept in the row as `*_host_states`."""
    rng = np.random.default_rng(settings.seed + 7 * n + r)
    c = flops.cached_states(n, r)
    t = settings.prompt_len
    dtype = parse_dtype(settings.dtype)
    engine = ctx.engine

    def run(batch: int) -> dict[str, Any]:
        host_inputs, device_inputs = [], []
        for _ in range(settings.rotations):
            states = rng.standard_normal((batch, c, ctx.cfg.hidden_size), dtype=np.float32).astype(engine.state_dtype)
            prompt = token_ids(rng, ctx.cfg, (t,))
            mask = np.ones((batch, c), np.int32)
            host_inputs.append(
                (np.broadcast_to(prompt, (batch, t)).copy(), np.ones((batch, t), np.int32), states, mask)
            )
            cache = PassageStates(states, mask.astype(np.int8), np.full((batch, c), r, np.int32), r)
            device_inputs.append(([prompt.tolist()], np.zeros(batch, np.int64), engine.place(cache), np.arange(batch)))

        def score(prompt_rows, prompt_of, device_states, passage_of):
            return engine.margins(prompt_rows, prompt_of, device_states, passage_of, batch_size=batch)

        compile_s = _first_call(score, device_inputs[0])
        timing = time_calls(score, device_inputs, warmup=settings.warmup, repeats=settings.repeats, compile_s=compile_s)
        host_compile_s = _first_call(engine.score_batch, host_inputs[0])
        host = time_calls(
            engine.score_batch, host_inputs, warmup=settings.warmup, repeats=settings.repeats, compile_s=host_compile_s
        )
        achieved = flops.decoder_flops(ctx.cfg, t, c) * batch / timing.median_s
        return {
            **_base_row("score", ctx, settings),
            "n": n,
            "r": r,
            "cached_states": c,
            "prompt_len": t,
            "batch": batch,
            "states": "device",
            "pairs_per_s": batch / timing.median_s,
            "s_per_pair": timing.median_s / batch,
            "flops_per_s": achieved,
            "mfu": achieved / peak_flops if peak_flops else None,
            **_timing_fields(timing),
            "pairs_per_s_host_states": batch / host.median_s,
            "s_per_pair_host_states": host.median_s / batch,
            "median_s_host_states": host.median_s,
            "min_s_host_states": host.min_s,
            "max_s_host_states": host.max_s,
            "compile_s_host_states": host.compile_s,
            "device_cache_bytes": device_inputs[0][2].nbytes,
            "peak_bytes": device_peak_bytes(),
            "cache_bytes_per_passage": flops.cache_bytes(ctx.cfg, n, r, dtype.itemsize),
        }

    return _with_oom_halving(min(settings.candidates, settings.score_batch), run)


def online_ratio_row(
    ctx: ShapeContext, encode: dict[str, Any], score: dict[str, Any], settings: BenchSettings
) -> dict[str, Any]:
    """Per-pair time without a cache (encode + score) over time with it (score only), beside the FLOP ratio."""
    n, r, t = score["n"], score["r"], settings.prompt_len
    measured = (encode["s_per_passage"] + score["s_per_pair"]) / score["s_per_pair"]
    analytic = flops.online_ratio(ctx.cfg, n, r, t)
    return {
        **_base_row("online_ratio", ctx, settings),
        "n": n,
        "r": r,
        "prompt_len": t,
        "encode_s_per_pair": encode["s_per_passage"],
        "score_s_per_pair": score["s_per_pair"],
        "measured_ratio": measured,
        "analytic_ratio": analytic,
        "measured_over_analytic": measured / analytic,
        "cross_encoder_analytic_ratio": flops.cross_encoder_ratio(ctx.cfg, n, r, t),
    }


def train_rows(ctx: ShapeContext, settings: BenchSettings, peak_flops: float | None) -> list[dict[str, Any]]:
    """Train-step rows (full fine-tuning and LoRA) through `kalm_jax.perf.bench.train_hook`; a `skipped` row
    with the reason when the training code is absent or its interface does not match."""
    from kalm_jax.perf.bench import train_hook

    rows = []
    for mode in ("full", "lora"):
        base = {
            **_base_row("train", ctx, settings),
            "mode": mode,
            "n": settings.train_n,
            "r": settings.train_r,
            "prompt_len": settings.prompt_len,
            "batch": settings.train_batch,
        }
        step = train_hook.build_step(ctx.cfg, settings, mode)
        if isinstance(step, str):
            rows.append({**base, "skipped": step})
            continue
        timing = time_calls(
            step.fn, step.inputs, warmup=settings.warmup, repeats=settings.repeats, compile_s=step.compile_s
        )
        per_example = flops.train_flops(
            ctx.cfg, settings.train_n, settings.train_r, settings.prompt_len, lora=mode == "lora"
        )
        achieved = per_example * settings.train_batch / timing.median_s
        tokens = settings.train_batch * (settings.train_n + settings.prompt_len)
        rows.append(
            {
                **base,
                "step_s": timing.median_s,
                "tokens_per_s": tokens / timing.median_s,
                "flops_per_s": achieved,
                "mfu": achieved / peak_flops if peak_flops else None,
                **_timing_fields(timing),
                "peak_bytes": device_peak_bytes(),
            }
        )
    return rows


def _guarded(
    kind: str, ctx: ShapeContext, settings: BenchSettings, fields: dict[str, Any], run: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """`run()`, or, when it raises, a row with `skipped: failed: <error>` (the traceback goes to stderr), so
    that one failing cell does not lose the rest of a run that may have cost a lent accelerator."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - reported in the row and on stderr
        import sys
        import traceback

        traceback.print_exc(file=sys.stderr)
        text = " ".join(str(err).split())[:300]
        return {**_base_row(kind, ctx, settings), **fields, "skipped": f"failed: {type(err).__name__}: {text}"}


def shape_rows(
    name: str, settings: BenchSettings, peak_flops: float | None, progress: Callable[[str], None] = lambda _: None
) -> Iterator[dict[str, Any]]:
    """All kalm-jax rows of one preset: encode per n, score per (n, r), online ratio per (n, r), train.
    A cell that fails gives a row with `skipped: failed: ...` and the run goes on."""
    ctx = build_model(name, settings)
    encodes: dict[int, dict[str, Any]] = {}
    for n in sorted(set(settings.encode_lengths) | set(settings.score_lengths)):
        progress(f"{name} encode n={n}")
        encodes[n] = _guarded(
            "encode", ctx, settings, {"n": n, "r": 1}, lambda n=n: encode_row(ctx, n, settings, peak_flops)
        )
        if n in settings.encode_lengths:
            yield encodes[n]
    for n in settings.score_lengths:
        for r in settings.ratios:
            progress(f"{name} score n={n} r={r}")
            row = _guarded(
                "score", ctx, settings, {"n": n, "r": r}, lambda n=n, r=r: score_row(ctx, n, r, settings, peak_flops)
            )
            yield row
            if "skipped" not in row and "skipped" not in encodes[n]:
                yield online_ratio_row(ctx, encodes[n], row, settings)
    if settings.train:
        progress(f"{name} train")
        yield from train_rows(ctx, settings, peak_flops)


__all__ = [
    "BenchSettings",
    "H100",
    "SUITES",
    "engine_for",
    "ShapeContext",
    "build_model",
    "encode_row",
    "score_row",
    "online_ratio_row",
    "train_rows",
    "shape_rows",
]
