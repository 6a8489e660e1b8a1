"""Export a trained model: LoRA merged into the base weights, written as a kalm-jax model checkpoint.

CLI: ``kalm-export WORKDIR_OR_STEP DIR [--config.keep_lora=true] [--config.quantization=int8]``
(HF safetensors export of the result: `kalm_jax.checkpoints.hf` / the convert tool.) The run's tokenizer
(tokenizer.model or tokenizer.json) is copied next to the exported checkpoint when it is found.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from kalm_jax.checkpoints import loader, orbax_io
from kalm_jax.model import quantization as quantize
from kalm_jax.text.load import copy_tokenizer


def export(
    source: str | Path,
    out_dir: str | Path,
    *,
    merge_lora: bool = True,
    overwrite: bool = False,
    quantization: str | None = None,
) -> Path:
    """Loads `source` (training workdir, step dir, model checkpoint or HF dir), merges LoRA, saves to `out_dir`.

    quantization: write quantized weights (`kalm_jax.model.quantization.MODES`; values and scales, restored
    bit for bit by the loader); None or "" keeps the source's weights. Quantizing merges LoRA (adapters on
    quantized weights are not supported), so it refuses `merge_lora=False`."""
    if quantization:
        quantize.check_mode(quantization)
        if not merge_lora:
            raise ValueError("keep_lora and quantization contradict each other: quantizing merges the adapters")
    _, model = orbax_io.load_any(source)
    if quantization:
        model = quantize.quantize_model(model, quantization)
    if merge_lora and model.has_lora:
        model.merge_lora()
    out = orbax_io.save_model(model, out_dir, overwrite=overwrite)
    with contextlib.suppress(FileNotFoundError):  # a checkpoint without a tokenizer exports without one
        copy_tokenizer(loader.find_tokenizer(source), out)
    return out
