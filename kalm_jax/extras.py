"""Optional extras: which `pip install 'kalm-jax[EXTRA]'` brings a missing package, and libtpu's quiet start.

The core install runs the `Reranker`, the inference engine and checkpoint conversion; training, evaluation,
the benchmark and TPU compilation need extras (pyproject.toml). A command that imports a package of a missing
extra stops with one line naming the install to run (`kalm_jax.cli.run` calls `missing_extra_message`).
"""

from __future__ import annotations

import glob
import importlib.util
import os

EXTRA_OF_MODULE = {
    "grain": "train",
    "tensorflow_datasets": "train",
    "array_record": "train",
    "tensorboardX": "train",
    "absl": "train",
    "bm25s": "eval",
    "Stemmer": "eval",
    "pytrec_eval": "eval",
    "matplotlib": "eval",
    "sklearn": "eval",
    "torch": "bench",
    "transformers": "bench",
    "libtpu": "tpu",
    "mteb": "mteb",
    "datasets": "mteb",
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
}
"""Top-level module name -> the extra that installs it."""


def missing_extra_message(error: ImportError) -> str | None:
    """One line naming the extra to install when `error` is a missing optional package, else None."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(name)
    if extra is None:
        return None
    return f"this command needs the optional package {name!r}: pip install 'kalm-jax[{extra}]'"


def _tpu_chip_present() -> bool:
    """True when a Google TPU PCI device is visible (the check JAX's own TPU start-up makes)."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == "0x1ae0":
                    return True
        except OSError:
            continue
    return False


def quiet_libtpu_without_tpu() -> None:
    """On a host with libtpu installed but no TPU chip, JAX's TPU plugin prints start-up errors (no TPU
    accelerator type, no worker hostnames) before falling back to the CPU. Giving libtpu a local description
    silences them; nothing is set when a TPU is present, when the user chose platforms or set any of these
    variables, or when libtpu is not installed. Must run before JAX initialises its backends."""
    keys = ("TPU_SKIP_MDS_QUERY", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE")
    if os.environ.get("JAX_PLATFORMS") or any(k in os.environ for k in keys):
        return
    if importlib.util.find_spec("libtpu") is None or _tpu_chip_present():
        return
    os.environ.update(TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost", TPU_ACCELERATOR_TYPE="v5litepod-4")


__all__ = ["EXTRA_OF_MODULE", "missing_extra_message", "quiet_libtpu_without_tpu"]
