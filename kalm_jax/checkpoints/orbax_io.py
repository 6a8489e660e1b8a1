"""Model checkpoints in Orbax format, and loading a model from any supported checkpoint path.

A *model checkpoint* directory holds:
  `kalm_model.json`  {"format": "kalm-jax-model", "version": 1, "config": <HF config.json dict>,
                      "param_dtype": "float32", "lora": null | {"rank", "alpha", "targets", "stacks"}}
  `params/`          an Orbax StandardCheckpointer tree of the model's `nnx.Param` state (LoRA factors incl.)
  `checksums.json`   sha256 of every file above (`kalm_jax.checkpoints.integrity`), verified before loading

Training runs (`train.py`) keep Orbax CheckpointManager steps in `<workdir>/checkpoints/<step>/` whose
`params` and `kalm_model` items have this same content, so `load_any` accepts an HF directory, a model
checkpoint, a training step directory or a training workdir (latest step).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from kalm_jax.atomic import atomic_directory, recover
from kalm_jax.checkpoints import integrity
from kalm_jax.model import quantization
from kalm_jax.model.build import LoRASpec, build_model
from kalm_jax.model.config import ModelConfig
from kalm_jax.model.t5gemma2 import T5Gemma2, param_tree

META_FILE = "kalm_model.json"
FORMAT = "kalm-jax-model"
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (unreadable metadata, missing or truncated parameter files)."""


def model_meta(model: T5Gemma2) -> dict[str, Any]:
    """JSON-serialisable description needed to rebuild `model`'s structure."""
    lora = None
    if model.has_lora:
        stacks = [s for s in ("encoder", "decoder") if getattr(model, s).lora_targets]
        first = getattr(model, stacks[0])
        a = getattr(first, f"{first.lora_targets[0]}_lora_a").get_value()
        lora = {
            "rank": int(a.shape[-1]),
            "alpha": first.lora_scale * int(a.shape[-1]),
            "targets": list(first.lora_targets),
            "stacks": stacks,
        }
    dtype = str(jax.numpy.dtype(model.embedding.get_value().dtype))
    meta = {
        "format": FORMAT,
        "version": 1,
        "config": model.config.to_hf(),
        "param_dtype": dtype,
        "compute_dtype": str(jax.numpy.dtype(model.dtype)),
        "lora": lora,
        "quantization": quantization.mode_of(model),
    }
    if getattr(model, "hf_source", None):
        # Where the model was imported from, so an HF export can carry that checkpoint's vision tensors.
        meta["hf_source"] = str(model.hf_source)
        meta["hf_passthrough"] = list(getattr(model, "hf_passthrough", ()))
    return meta


def build_abstract(meta: dict[str, Any], *, param_dtype=None, compute_dtype=None) -> T5Gemma2:
    """The abstract (shape-only) model described by `meta` (see `model_meta`); quantized weights (values and
    scales) when `meta["quantization"]` names a mode."""
    cfg = ModelConfig.from_hf(meta["config"], source=META_FILE)
    model = build_model(
        cfg,
        abstract=True,
        lora=LoRASpec.from_meta(meta.get("lora")),  # factors in fp32 whatever the param dtype
        param_dtype=param_dtype or meta.get("param_dtype", "float32"),
        dtype=compute_dtype or None,
    )
    mode = meta.get("quantization") or "none"
    if mode not in quantization.MODES:
        raise CheckpointError(f"{META_FILE}: quantization {mode!r} is none of {', '.join(quantization.MODES)}")
    return quantization.abstract_quantized(model, mode)


def save_model(
    model: T5Gemma2,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> Path:
    """Writes a model checkpoint atomically (temporary directory, then rename). Returns the path.

    `extra_files` ({name in the checkpoint: source path}, e.g. the tokenizer) are copied in before the rename.
    """
    out = Path(directory).absolute()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", param_tree(model))
        ckptr.wait_until_finished()
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        (tmp / META_FILE).write_text(json.dumps(model_meta(model), indent=1, sort_keys=True))
        integrity.write(tmp, ["params", META_FILE, *(extra_files or {})])
    return out


def restore_params(model: T5Gemma2, params_dir: str | os.PathLike) -> T5Gemma2:
    """Restores an Orbax param tree into the (abstract or concrete) `model`, in the model's dtypes, onto
    this process's first device (whatever devices or processes wrote it: a pod's checkpoint loads here)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), param_tree(model))
    params_dir = Path(params_dir).absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (the checkpoint has no parameters)")
    try:
        restored = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # noqa: BLE001 - tensorstore errors carry a multi-KB spec; keep the first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(
            f"{params_dir}: cannot restore the parameters ({type(e).__name__}: {first}); "
            "the checkpoint is truncated, corrupt, or of another model shape"
        ) from None
    nnx.update(model, restored)
    return model


def load_model(directory: str | os.PathLike, *, dtype=None, compute_dtype=None) -> tuple[ModelConfig, T5Gemma2]:
    """Loads a model checkpoint written by `save_model` (or a training step directory)."""
    d = Path(directory)
    meta_path = find_meta(d)
    if meta_path is None:
        raise FileNotFoundError(f"{d}: no {META_FILE} (not a kalm-jax model checkpoint)")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: format {found!r}, expected {FORMAT!r}")
    integrity.verify(d, prefixes=("params/", META_FILE, "kalm_model/"))  # IntegrityError naming a changed file
    model = build_abstract(meta, param_dtype=dtype, compute_dtype=compute_dtype)
    restore_params(model, d / "params")
    if meta.get("hf_source"):
        model.hf_source = meta["hf_source"]
        model.hf_passthrough = tuple(meta.get("hf_passthrough", ()))
    return model.config, model


def find_meta(d: Path) -> Path | None:
    for candidate in (d / META_FILE, d / "kalm_model" / META_FILE, d / "kalm_model" / "metadata"):
        if candidate.is_file():
            return candidate
    return None


def step_dirs(workdir: str | os.PathLike) -> list[Path]:
    """Finished step directories under `<workdir>/checkpoints/`, oldest first."""
    root = Path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return [p for _, p in sorted((int(p.name), p) for p in root.iterdir() if p.is_dir() and p.name.isdigit())]


def latest_step_dir(workdir: str | os.PathLike) -> Path | None:
    """The newest finished step directory under `<workdir>/checkpoints/`, or None."""
    steps = step_dirs(workdir)
    return steps[-1] if steps else None


def is_hf_dir(p: str | os.PathLike) -> bool:
    """True for a Hugging Face checkpoint directory: config.json + *.safetensors (or a sharded index)."""
    p = Path(p)
    return (p / "config.json").is_file() and (
        any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()
    )


def checkpoint_dir(p: str | os.PathLike) -> Path:
    """A path given to `load_any`: a file inside a checkpoint (config.json, kalm_model.json, a safetensors
    file) means the checkpoint directory holding it."""
    p = Path(p)
    if not p.is_file():
        return p
    d = p.parent
    if d.name == "kalm_model" and p.name in (META_FILE, "metadata"):
        return d.parent  # <step>/kalm_model/kalm_model.json
    return d


def load_any(path: str | os.PathLike, *, dtype=None, compute_dtype=None) -> tuple[ModelConfig, T5Gemma2]:
    """Loads an HF directory, a model checkpoint, a training step directory or a training workdir.

    A file inside a checkpoint (e.g. `.../config.json`) stands for its directory. In a workdir, a latest step
    that cannot be loaded (corrupt, truncated) is skipped with a warning for the previous complete one.
    """
    p = Path(path)
    recover(p)  # finish an atomic replace of this checkpoint that a kill interrupted
    if not p.exists():
        raise FileNotFoundError(f"{p}: checkpoint path does not exist")
    p = checkpoint_dir(p)
    if is_hf_dir(p):
        from kalm_jax.checkpoints import hf

        return hf.load(p, dtype=dtype or "float32", compute_dtype=compute_dtype)
    if find_meta(p) is not None:
        return load_model(p, dtype=dtype, compute_dtype=compute_dtype)
    steps = [s for s in step_dirs(p) if find_meta(s) is not None]
    for i, step in enumerate(reversed(steps)):
        try:
            return load_model(step, dtype=dtype, compute_dtype=compute_dtype)
        except (CheckpointError, integrity.IntegrityError) as e:
            if i == len(steps) - 1:
                raise
            log.warning(
                "%s cannot be loaded (%s); falling back to the previous step %s",
                step,
                e,
                steps[len(steps) - 2 - i].name,
            )
    raise ValueError(
        f"{p}: not an HF checkpoint (config.json + *.safetensors), a kalm-jax model checkpoint "
        f"({META_FILE} + params/) or a training workdir with checkpoints/<step>/"
    )


def fingerprint(model: T5Gemma2) -> str:
    """A content hash of what the model computes (for cache keys): its config, its parameters and, for quantized
    weights, the mode (int8 and int8-dynamic share their weights but not their outputs); costs one pass over
    the parameters. A float model's hash is the hash of its config and parameters alone."""
    import hashlib

    h = hashlib.sha256(json.dumps(model.config.to_hf(), sort_keys=True).encode())
    mode = quantization.mode_of(model)
    if mode != "none":
        h.update(f"quantization={mode}".encode())
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(param_tree(model))[0], key=lambda x: str(x[0])):
        arr = np.asarray(leaf)
        h.update(str(path).encode())
        h.update(str(arr.dtype).encode())
        h.update(np.ascontiguousarray(arr).view(np.uint8).tobytes())
    return h.hexdigest()[:16]


__all__ = [
    "save_model",
    "load_model",
    "load_any",
    "restore_params",
    "build_abstract",
    "model_meta",
    "latest_step_dir",
    "step_dirs",
    "fingerprint",
    "checkpoint_dir",
    "is_hf_dir",
    "META_FILE",
    "CheckpointError",
]
