"""Per-device memory of a compiled program against the chip's HBM (XLA's buffer assignment, or the size an
out-of-memory error names)."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from kalm_jax.perf.aot.topology import GiB


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device memory of one compiled program (bytes) against the chip's HBM."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int
    hbm: int
    compile_seconds: float
    error: str | None = None  # the compiler's out-of-memory message, when it refused the program
    unread: int = 0
    """Bytes per device the caller holds for the program that it does not read, which the compiler leaves out of
    `arguments`: an engine's weights of the other stack (`unread_bytes`)."""

    @property
    def total(self) -> int:
        """What the device holds while the program runs: the compiler's buffers and the `unread` arguments."""
        return self.arguments + self.unread + self.outputs - self.aliased + self.temporaries + self.generated_code

    @property
    def fits(self) -> bool:
        return self.error is None and self.total <= self.hbm

    @classmethod
    def from_compiled(cls, name: str, compiled, hbm: int, seconds: float) -> MemoryReport:
        m = compiled.memory_analysis()
        return cls(
            name,
            int(m.argument_size_in_bytes),
            int(m.output_size_in_bytes),
            int(m.alias_size_in_bytes),
            int(m.temp_size_in_bytes),
            int(m.generated_code_size_in_bytes),
            hbm,
            seconds,
        )


def unread_bytes(report: MemoryReport, args) -> int:
    """The bytes per device of `args` (a program's arguments: arrays or `jax.ShapeDtypeStruct`s with their
    shardings, e.g. `InferenceEngine.encode_program(...).args`) beyond the arguments the compiled program of
    `report` takes (XLA drops those it does not read: the encode program leaves the decoder's weights out,
    score the encoder's, though the engine holds both); 0 for a program the compiler refused."""
    import jax

    if report.error:
        return 0
    held = 0
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or not hasattr(leaf, "shape"):
            continue
        held += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return max(0, held - report.arguments)


# e.g. "the total memory required for HLO temporaries (805.51G) exceeds available HBM (15.75G)"
_OOM_TOTAL = re.compile(r"\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM", re.I)


def _parse_oom(message: str) -> int:
    """Best-effort required bytes from an XLA TPU RESOURCE_EXHAUSTED message (0 when absent)."""
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    m = _OOM_TOTAL.search(message)
    return int(float(m.group(1)) * scale[m.group(2).upper()]) if m else 0


def compile_report(name: str, lower: Callable[[], Any], mesh, hbm: int) -> MemoryReport:
    """Lowers (under `jax.set_mesh(mesh)`, which the TPU attention kernel's shard_map needs) and compiles;
    an out-of-memory refusal by the compiler becomes a non-fitting report."""
    import jax

    t = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            lowered = lower()
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED when the program cannot fit in HBM
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        need = _parse_oom(msg)
        return MemoryReport(name, 0, 0, 0, need, 0, hbm, time.perf_counter() - t, error=msg.strip())
    return MemoryReport.from_compiled(name, compiled, hbm, time.perf_counter() - t)


def format_table(reports: Sequence[MemoryReport], title: str = "") -> str:
    """A fixed-width table, GiB per device, one row per program."""

    def g(b: int) -> str:
        return f"{b / GiB:10.3f}"

    width = max([12, *(len(r.name) + 1 for r in reports)])
    head = (
        f"{'program':<{width}}{'args':>10}{'unread':>10}{'outputs':>10}{'aliased':>10}{'temps':>10}{'code':>10}"
        f"{'total':>10}"
        f"{'HBM':>10}{'used':>7}{'compile':>9}  fits"
    )
    lines = ([title] if title else []) + [head + "   (GiB per device)", "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r.name:<{width}}{g(r.arguments)}{g(r.unread)}{g(r.outputs)}{g(r.aliased)}{g(r.temporaries)}"
            f"{g(r.generated_code)}{g(r.total)}{g(r.hbm)}{100 * r.total / r.hbm:6.0f}%"
            f"{r.compile_seconds:8.1f}s  {'yes' if r.fits else 'NO'}"
        )
        if r.error:
            lines.append(f"    compiler: {r.error.splitlines()[0][:300]}")
    return "\n".join(lines)
