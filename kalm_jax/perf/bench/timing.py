"""Wall-clock timing of jitted functions: AOT compile time, warm-up, device sync, medians, rotated inputs."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: median, min and max over `repeats` timed calls; `compile_s` is lower+compile."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    compile_s: float | None = None


def compile_aot(jitted, *args, **static) -> tuple[Callable, float]:
    """Lowers and compiles `jitted` for `args`; returns (compiled executable, seconds it took).

    Static arguments go in `static` (by name) and are left out of the compiled call.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args, **static).compile()
    return compiled, time.perf_counter() - start


def time_calls(
    fn: Callable[..., Any],
    inputs: Sequence[tuple],
    *,
    warmup: int = 2,
    repeats: int = 5,
    compile_s: float | None = None,
) -> Timing:
    """Times `fn(*inputs[i % len(inputs)])` with `jax.block_until_ready` after every call.

    Inputs rotate through `inputs` (distinct arrays already on device) so no call reuses the previous
    call's buffers; `warmup` untimed calls run first (first-call allocation, autotuning).
    """
    if not inputs:
        raise ValueError("time_calls needs at least one input tuple")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for i in range(warmup):
        jax.block_until_ready(fn(*inputs[i % len(inputs)]))
    times = []
    for i in range(repeats):
        args = inputs[(warmup + i) % len(inputs)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats, compile_s)


def time_host(
    fn: Callable[..., Any], inputs: Sequence[tuple], sync: Callable[[], None], *, warmup: int = 2, repeats: int = 5
) -> Timing:
    """`time_calls` for non-JAX work (the PyTorch peer): `sync()` (e.g. torch.cuda.synchronize) ends each call."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
        sync()
    times = []
    for i in range(repeats):
        args = inputs[(warmup + i) % len(inputs)]
        sync()
        start = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats, None)


def compiled_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled executable (XLA's static memory analysis)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - getattr(m, "alias_size_in_bytes", 0)
    )


def device_peak_bytes(device=None) -> int | None:
    """The device allocator's running peak (GPU/TPU `memory_stats()['peak_bytes_in_use']`); None on CPU."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def measure_matmul_peak(
    dtype="bfloat16", sizes: Sequence[int] | None = None, *, repeats: int = 5, chain: int = 8
) -> dict[str, Any]:
    """Measured dense matmul throughput (FLOP/s) in `dtype`: the MFU denominator.

    Runs a jitted chain of `chain` dependent [m, m] @ [m, m] products per call (amortising dispatch) for
    each size and returns the best median. Defaults: 4096/8192/16384 on accelerators, 512/1024 on CPU.
    """
    import jax.numpy as jnp

    if sizes is None:
        sizes = (512, 1024) if jax.default_backend() == "cpu" else (4096, 8192, 16384)
    dt = jnp.dtype(dtype)

    @jax.jit
    def run(a, b):
        def body(_, x):
            return jnp.dot(x, b, preferred_element_type=jnp.float32).astype(dt)

        return jax.lax.fori_loop(0, chain, body, a)

    best = {
        "peak_flops": 0.0,
        "size": None,
        "dtype": str(dt),
        "backend": jax.default_backend(),
        "device": jax.local_devices()[0].device_kind,
    }
    for m in sizes:
        keys = jax.random.split(jax.random.key(m), 4)
        # Scaled so the chained products stay O(1) (no inf/denormal slow paths).
        inputs = [
            (
                jax.random.normal(keys[i], (m, m), dt),
                (jax.random.normal(keys[i + 2], (m, m), dt) / np.sqrt(m)).astype(dt),
            )
            for i in range(2)
        ]
        t = time_calls(run, inputs, warmup=1, repeats=repeats)
        flops = 2.0 * m * m * m * chain / t.median_s
        if flops > best["peak_flops"]:
            best.update(peak_flops=flops, size=m)
    return best


__all__ = [
    "Timing",
    "compile_aot",
    "time_calls",
    "time_host",
    "compiled_bytes",
    "device_peak_bytes",
    "measure_matmul_peak",
]
