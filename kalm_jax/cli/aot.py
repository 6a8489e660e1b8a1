"""`kalm-aot`: ahead-of-time compilation of encode, score and the train step for a TPU slice described on this
host (memory check, and with ``--report`` the compiler's cost model per chip; `kalm_jax.perf.aot`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from kalm_jax import cli
from kalm_jax.perf import aot


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (`kalm_jax.cli`): settings from configs/tpu.py:<preset>,<topology>[,<slices>] plus
    `--config.KEY=VALUE` overrides; `--topology`, `--num_slices`, `--programs` and `--report` choose the check."""
    # A CPU-only host: never grab a local accelerator, and tell libtpu not to probe for TPU VM metadata
    # (the topology is described from the arguments, not discovered).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        os.environ.setdefault(key, value)
    flags = (
        cli.Flag("topology", None, "TPU slice type, e.g. v5e-256, v5p-128, v4-32, v6e-256"),
        cli.Flag("num_slices", 1, "slices joined over DCN (data axis spans them)", int),
        cli.Flag("programs", ",".join(aot.PROGRAMS), "comma-separated subset of encode,score,train"),
        cli.Flag("report", None, "also write the compiler's cost model per chip (a JSON list of rows)"),
        cli.Flag(
            "analysis_layers",
            "auto",
            "with --report: 'all' unrolls every layer in the analysis compile; "
            "'sampled' compiles 2, 3 and one period of layers per stack and extrapolates per layer "
            "type (programs too large to unroll whole on this host); 'auto' samples the train step and "
            "unrolls encode and score",
        ),
        cli.Flag(
            "weights",
            None,
            "the inference mesh policy's setting for encode / score: auto, replicated, tensor, tensor:N "
            "(default: KALM_INFERENCE_WEIGHTS, else auto)",
        ),
        cli.Flag(
            "quantization",
            "none",
            "weight quantization of encode / score (kalm_jax.model.quantization): none, int8, int8-dynamic, fp8, "
            "or several comma-separated (one set of rows per mode)",
        ),
        cli.Flag(
            "states",
            "compute",
            "the engine's device_states for score: compute (passage states in the compute dtype) or int8 (int8 values "
            "+ an fp32 scale per window, dequantized inside the score program)",
        ),
        cli.Flag(
            "fit_batch",
            False,
            "also find the largest encode / score batch that fits HBM (a line fitted from two compiles, checked by a "
            "third)",
            bool,
        ),
        cli.Flag(
            "hbm_bound",
            False,
            "with --report: also compile each encode / score analysis with every buffer in HBM (no memory-space "
            "assignment), for an upper bound on its HBM bytes beside the compiler's bytes accessed, which count "
            "on-chip buffers and prefetches too",
            bool,
        ),
    )
    return cli.run(aot.check, "tpu.py:nano,v5e-256", argv=argv, flags=flags, errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
