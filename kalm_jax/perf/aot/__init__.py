"""Ahead-of-time compilation for TPU topologies on any host (MaxText `train_compile`, T5X `precompile`).

With the TPU runtime library installed (`pip install 'kalm-jax[tpu]'`, i.e. the `libtpu` wheel that
matches jax), `jax.experimental.topologies` describes a TPU slice (e.g. v5e-256) without the hardware.
This module lowers and compiles, with abstract, sharded inputs (`jax.ShapeDtypeStruct(..., sharding=...)`),
the inference engine's own encode and score programs (on the mesh its policy, `kalm_jax.parallel.inference_policy`,
chooses for those devices) and the real train step (on the config's ("data", "fsdp", "tensor") mesh), and
reports per-device memory against the chip's HBM.

    kalm-aot --config=tpu.py:nano,v5e-256 --topology=v5e-256

A passing check guarantees: the shardings are consistent (every array splits over its mesh axes), the
program (including the Pallas TPU attention kernel) compiles for that chip generation and slice shape,
and XLA's static buffer assignment fits in HBM. It does not measure speed, and does not cover
host-side input or checkpoint I/O.

Modules: `topology` (TPU slices), `programs` (workload, abstract inputs, the engine's programs, the train step),
`memory` (per-device memory), `cost` (the compiler's cost model), `hlo_cost` (instructions without one), `check`
(the check itself; the command is `kalm_jax.cli.aot`). The names below are the package's API.
"""

from kalm_jax.perf.aot.check import AotResult, check, mesh_for, run
from kalm_jax.perf.aot.cost import (
    ANALYSIS,
    ANALYSIS_LAYERS,
    COST_KEYS,
    MIN_FLOPS_RATIO,
    UNKNOWN_COST_CALLS,
    analyse,
    cost_fields,
    cost_row,
    extrapolate_costs,
    format_cost_table,
    layer_samples,
    useful_flops,
)
from kalm_jax.perf.aot.memory import MemoryReport, compile_report, format_table, unread_bytes
from kalm_jax.perf.aot.programs import (
    PROGRAMS,
    Workload,
    abstract_state,
    batch_input,
    config_value,
    engine_program,
    inference_engine,
    lower_encode,
    lower_score,
    lower_train,
    model_config,
    workload_from_config,
)
from kalm_jax.perf.aot.topology import HBM_BYTES, GiB, TpuSlice, topology_devices, tpu_slice

__all__ = [
    "PROGRAMS",
    "AotResult",
    "check",
    "mesh_for",
    "run",
    "ANALYSIS",
    "ANALYSIS_LAYERS",
    "COST_KEYS",
    "MIN_FLOPS_RATIO",
    "UNKNOWN_COST_CALLS",
    "analyse",
    "cost_fields",
    "cost_row",
    "extrapolate_costs",
    "format_cost_table",
    "layer_samples",
    "useful_flops",
    "MemoryReport",
    "compile_report",
    "unread_bytes",
    "format_table",
    "Workload",
    "abstract_state",
    "batch_input",
    "config_value",
    "inference_engine",
    "engine_program",
    "lower_encode",
    "lower_score",
    "lower_train",
    "model_config",
    "workload_from_config",
    "HBM_BYTES",
    "GiB",
    "TpuSlice",
    "topology_devices",
    "tpu_slice",
]
