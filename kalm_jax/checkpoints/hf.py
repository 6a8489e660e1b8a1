"""Hugging Face `t5gemma2` checkpoints ⇄ the NNX model: `load` and `save`.

The name/layout map lives in `kalm_jax.checkpoints.hf_layout` (data) and the safetensors reading/writing in
`kalm_jax.checkpoints.safetensors_io`; this module joins them to the model. Names of both are re-exported here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kalm_jax.atomic import atomic_directory
from kalm_jax.checkpoints.hf_layout import (
    LAYER_NAMES,
    PASSTHROUGH_PREFIXES,
    STACKS,
    TIED_ALIASES,
    TOP_NAMES,
    TensorSpec,
    canonical_name,
    hf_shape,
    tensor_specs,
)
from kalm_jax.checkpoints.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    ST_DTYPES,
    Entry,
    SafetensorsDir,
    parse_size,
    plan_shards,
    read_safetensors_header,
    write_safetensors,
)
from kalm_jax.model import quantization
from kalm_jax.model.build import build_model
from kalm_jax.model.config import ModelConfig, parse_dtype
from kalm_jax.model.t5gemma2 import T5Gemma2, lora_delta, stack_param_shapes
from kalm_jax.text.load import files_to_write, tokenizer_files


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Reads and validates `config.json` of an HF checkpoint directory."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: missing (an HF checkpoint directory needs config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except (RecursionError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not a readable JSON config ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
    return ModelConfig.from_hf(raw, source=str(cfg_path))


def check_tensors(cfg: ModelConfig, available: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """Compares HF tensors {name: shape} with what `cfg` needs.

    Returns (problems, passthrough): human-readable problems (missing, mis-shaped, unexpected), and the
    names of vision/projector tensors that are carried but unused.
    """
    problems, passthrough = [], []
    expected = {s.hf_name: s.hf_shape for s in tensor_specs(cfg)}
    canon = {}
    for name, shape in available.items():
        c = canonical_name(name)
        if c.startswith(PASSTHROUGH_PREFIXES):
            passthrough.append(name)
        elif c in TIED_ALIASES:
            want = (cfg.vocab_size, cfg.hidden_size) if c.endswith("weight") else (cfg.hidden_size,)
            if tuple(shape) != want:
                problems.append(f"tied alias {name}: shape {tuple(shape)}, expected {want}")
        else:
            canon[c] = (name, tuple(shape))
    for name, shape in expected.items():
        if name not in canon:
            problems.append(f"missing tensor {name} (shape {shape})")
        elif canon[name][1] != shape:
            problems.append(f"tensor {canon[name][0]} has shape {canon[name][1]}, expected {shape}")
    for c, (name, shape) in canon.items():
        if c not in expected:
            problems.append(f"unexpected tensor {name} (shape {shape})")
    return problems, sorted(passthrough)


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))


def load(
    path: str | os.PathLike,
    dtype="float32",
    *,
    compute_dtype=None,
    progress: bool | None = None,
) -> tuple[ModelConfig, T5Gemma2]:
    """Loads an HF T5Gemma 2 / KaLM-Reranker-V1 checkpoint directory into the NNX model.

    Args:
      path: directory with `config.json` and `model.safetensors` (or shards + `model.safetensors.index.json`);
        the weights come from the files transformers reads (`safetensors_io.weights_file`).
      dtype: parameter dtype ('float32' or 'bfloat16'); also the compute dtype unless `compute_dtype` is set.
      progress: show a progress bar (default: for checkpoints over 1 GiB).
    Returns:
      (config, model). Vision-tower tensors are not loaded; their names are kept in
      `model.hf_passthrough` (and the source directory in `model.hf_source`) so `save` can carry them.
    Raises:
      ValueError naming every missing, unexpected or mis-shaped tensor, a weight stored as an integer or
      bool tensor, a weight holding NaN/inf, or a wrong model type.
    """
    param_dtype = parse_dtype(dtype)
    cfg = read_config(path)
    st = SafetensorsDir(path)
    try:
        shapes = {name: st.shape_dtype(name)[0] for name in st.names()}
        problems, passthrough = check_tensors(cfg, shapes)
        skip = set(passthrough)
        problems += [
            f"{name}: stored as {st.shape_dtype(name)[1]}; model weights must be floating point "
            f"({', '.join(FLOAT_ST_DTYPES)})"
            for name in st.names()
            if name not in skip and st.shape_dtype(name)[1] not in FLOAT_ST_DTYPES
        ]
        if problems:
            head = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ValueError(
                f"{path}: checkpoint does not match its config.json ({len(problems)} problems):\n  {head}{more}"
            )
        model = build_model(cfg, abstract=True, param_dtype=param_dtype, dtype=compute_dtype)
        by_canon = {canonical_name(n): n for n in st.names()}
        np_dtype = _np_dtype(param_dtype)
        specs = tensor_specs(cfg)
        total = sum(int(np.prod(s.hf_shape)) for s in specs) * np_dtype.itemsize
        show = progress if progress is not None else total > (1 << 30)
        buffers: dict[tuple[str, ...], np.ndarray] = {}
        for spec in tqdm(specs, desc=f"loading {Path(path).name}", unit="tensor", disable=not show):
            raw = st.get(by_canon[spec.hf_name])
            if not np.isfinite(raw).all():
                bad = int(raw.size - np.isfinite(raw).sum())
                raise ValueError(
                    f"{st.files[by_canon[spec.hf_name]]}: tensor {by_canon[spec.hf_name]} holds {bad} "
                    "non-finite values (NaN/inf); refusing to load a broken checkpoint"
                )
            value = spec.to_ours(raw, cfg).astype(np_dtype, copy=False)
            if spec.layer is None:
                _set(model, spec.path, value)
                continue
            buf = buffers.get(spec.path)
            if buf is None:
                var = _get(model, spec.path)
                buf = buffers[spec.path] = np.empty(var.get_value().shape, np_dtype)
            buf[spec.layer] = value
            if spec.layer == buf.shape[0] - 1:
                _set(model, spec.path, buffers.pop(spec.path))
    finally:
        st.close()
    model.hf_passthrough = tuple(passthrough)
    model.hf_source = str(Path(path).resolve())
    return cfg, model


FLOAT_ST_DTYPES = ("F32", "BF16", "F16", "F64")
"""safetensors dtypes a weight may be stored in (integer/bool tensors are refused, not cast)."""


def _get(model, path: tuple[str, ...]) -> nnx.Variable:
    obj = model
    for p in path:
        obj = getattr(obj, p)
    return obj


def _set(model, path: tuple[str, ...], value: np.ndarray) -> None:
    _get(model, path).set_value(jnp.asarray(value))


# ---------------------------------------------------------------------- export


def _ours_shape(spec: TensorSpec, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of the NNX variable `spec` lives in (stacked: with the leading layers axis)."""
    h = cfg.hidden_size
    name = spec.path[-1]
    if spec.layer is not None:
        stack = spec.path[0]
        return stack_param_shapes(cfg, len(getattr(cfg, f"{stack}_layer_types")))[name]
    return (cfg.vocab_size, h) if name == "embedding" else (h,)


def export_problems(model: T5Gemma2, config: ModelConfig | None = None) -> list[str]:
    """Every model variable whose shape does not match `config` (default `model.config`), incl. LoRA factors.

    Reads shapes only, so it works on abstract models and costs nothing.
    """
    cfg = config or model.config
    problems = []
    seen = set()
    for spec in tensor_specs(cfg):
        if spec.path in seen:
            continue
        seen.add(spec.path)
        want = _ours_shape(spec, cfg)
        try:
            got = tuple(_get(model, spec.path).get_value().shape)
        except AttributeError:
            problems.append(f"model has no parameter {'.'.join(spec.path)} (needed for {spec.hf_name})")
            continue
        if got != want:
            problems.append(
                f"parameter {'.'.join(spec.path)} has shape {got}, but the config needs {want} "
                f"(exported as {spec.hf_name.replace('.0.', '.{i}.')})"
            )
    for stack in ("encoder", "decoder"):
        ls = getattr(model, stack)
        for name in ls.lora_targets:
            w = tuple(getattr(ls, name).get_value().shape)
            a = tuple(getattr(ls, f"{name}_lora_a").get_value().shape)
            b = tuple(getattr(ls, f"{name}_lora_b").get_value().shape)
            n_in = len(a) - 2
            if a[0] != w[0] or b[0] != w[0] or a[1:-1] != w[1 : 1 + n_in] or b[2:] != w[1 + n_in :] or a[-1] != b[1]:
                problems.append(f"LoRA factors of {stack}.{name}: A {a} and B {b} do not fit the weight {w}")
    return problems


def hf_tensor(model: T5Gemma2, spec: TensorSpec, dtype=None, *, merge_lora: bool = True) -> np.ndarray:
    """One Hub-layout tensor of `model` as a contiguous numpy array (LoRA delta folded in when present).

    The LoRA fold follows `LayerStack.merge_lora` exactly: (w in fp32 + scale·A@B) cast back to w's dtype,
    then to `dtype` (default: the parameter dtype). Only this one layer's slice is materialised on the host.
    """
    cfg = model.config
    value = _get(model, spec.path).get_value()
    if spec.layer is not None:
        value = value[spec.layer]
        stack = getattr(model, spec.path[0])
        name = spec.path[-1]
        if merge_lora and name in stack.lora_targets:
            a = getattr(stack, f"{name}_lora_a").get_value()[spec.layer][None]
            b = getattr(stack, f"{name}_lora_b").get_value()[spec.layer][None]
            delta = lora_delta(a, b, (1, *value.shape), stack.lora_scale)[0]
            value = (value.astype(jnp.float32) + delta).astype(value.dtype)
    out = spec.to_hf(np.asarray(value), cfg)
    if dtype is not None:
        out = out.astype(_np_dtype(parse_dtype(dtype)), copy=False)
    return np.ascontiguousarray(out)


def iter_hf_tensors(
    model: T5Gemma2,
    dtype="bfloat16",
    *,
    merge_lora: bool = True,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (Hub name, PyTorch-layout numpy tensor in `dtype`) for every text tensor, one at a time.

    LoRA adapters are folded into their base weights on the fly (the model itself is not changed).
    """
    for spec in tensor_specs(model.config):
        yield spec.hf_name, hf_tensor(model, spec, dtype, merge_lora=merge_lora)


def _vision_config(source: Path) -> dict | None:
    try:
        enc = json.loads((source / "config.json").read_text()).get("encoder", {})
    except (OSError, json.JSONDecodeError):
        return None
    return enc.get("vision_config")


def save(
    model: T5Gemma2,
    config: ModelConfig | None,
    out_dir: str | os.PathLike,
    *,
    dtype="bfloat16",
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    tokenizer=None,
    overwrite: bool = False,
    vision_from: str | os.PathLike | bool | None = None,
    merge_lora: bool = True,
    progress: bool | None = None,
    dequantize: bool = False,
) -> Path:
    """Writes `model` as a Hugging Face `t5gemma2` checkpoint that `T5Gemma2ForConditionalGeneration` loads.

    Output: `config.json` (`config.to_hf()`, dtype set to `dtype`), `generation_config.json`, Hub-layout
    safetensors (tied aliases omitted, PyTorch [out, in] layout) in one `model.safetensors` or in
    `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` with
    `model.safetensors.index.json`, and tokenizer files when known.

    Args:
      model: the NNX model (concrete). LoRA adapters are folded into the exported weights on the fly;
        `model` is not modified.
      config: the config to write (None: `model.config`); its shapes must match the model's parameters.
      out_dir: target directory. Written as a temporary sibling directory and renamed into place at the
        end, so an interrupted export never leaves a complete-looking directory (and an existing one is
        replaced only once the new one is complete).
      dtype: 'bfloat16' (default, the released checkpoints' dtype) or 'float32' for the text tensors.
      max_shard_bytes: shard size limit (int or '5GB'-style string).
      tokenizer: a `kalm_jax.text.spm.Tokenizer`, a `tokenizer.model` file or a directory with tokenizer
        files; None copies the tokenizer files found beside the model's HF source, if any.
      vision_from: HF directory whose vision-tower/projector tensors (and `vision_config`) are carried
        byte-for-byte; None uses the tensors recorded at import (`model.hf_passthrough` from
        `model.hf_source`); False exports text only. A text-only checkpoint loads in transformers, which
        then initialises the unused vision tower randomly (with a warning); text outputs are unaffected.
      progress: per-tensor progress bar (default: for exports over 1 GiB).
      dequantize: export a quantized model (`kalm_jax.model.quantization`) as float weights (values x scales:
        the quantization error stays in them); without it a quantized model is refused.
    Returns:
      The output directory.
    Raises:
      FileExistsError (out_dir exists, overwrite False), ValueError naming every mis-shaped parameter or
      a missing passthrough tensor, or a quantized model without `dequantize`, all before anything is written.
    """
    mode = quantization.mode_of(model)
    if mode != "none":
        if not dequantize:
            raise ValueError(
                f"the model's weights are quantized ({mode}) and transformers' t5gemma2 reads float weights: "
                "export the float checkpoint it was quantized from, or pass dequantize=True "
                "(--config.dequantize=True) to write values x scales (the quantization error stays in them)"
            )
        model = quantization.dequantize_model(model)
    cfg = config or model.config
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"config must be a kalm_jax ModelConfig, got {type(cfg).__name__}")
    np_dtype = _np_dtype(parse_dtype(dtype))
    max_bytes = parse_size(max_shard_bytes)
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")

    # ---- validate everything before writing anything
    problems = export_problems(model, cfg)
    if problems:
        raise ValueError(
            f"cannot export to {out}: the model does not match the config "
            f"({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
    hf_config = cfg.to_hf()
    ModelConfig.from_hf(hf_config, source="the config.json to be written")  # must read back

    if vision_from is False:
        source = None
    elif vision_from is not None:
        source = Path(vision_from)
    else:
        source = Path(model.hf_source) if getattr(model, "hf_source", None) else None
    passthrough: list[str] = []
    st_src = None
    if source is not None:
        if vision_from is not None:
            if not source.is_dir():
                raise FileNotFoundError(f"vision_from={source}: not a directory")
            st_src = SafetensorsDir(source)
            passthrough = sorted(n for n in st_src.names() if canonical_name(n).startswith(PASSTHROUGH_PREFIXES))
            if not passthrough:
                raise ValueError(f"vision_from={source}: has no vision tower / projector tensors")
        elif getattr(model, "hf_passthrough", ()):
            passthrough = list(model.hf_passthrough)
            if not source.is_dir():
                raise FileNotFoundError(
                    f"{source}: the HF checkpoint this model was imported from is gone, so its "
                    f"{len(passthrough)} vision tensors cannot be carried; pass vision_from= "
                    f"(--config.vision_from) another copy, or vision_from=False (--config.text_only=true)"
                )
            st_src = SafetensorsDir(source)
            missing = [n for n in passthrough if n not in st_src.files]
            if missing:
                raise ValueError(f"{source}: vision tensors recorded at import are missing now: {missing[:5]}")
        if passthrough:
            vision = _vision_config(source)
            if vision is not None:
                hf_config["encoder"]["vision_config"] = vision
    hf_config["dtype"] = str(np_dtype)
    if "torch_dtype" in hf_config:
        hf_config["torch_dtype"] = str(np_dtype)

    tok_files: dict[str, Path | bytes] = {}
    if tokenizer is not None:
        tok_files = files_to_write(tokenizer)
    elif source is not None:
        tok_files = tokenizer_files(source)
    gen_src = source / "generation_config.json" if source is not None else None

    st_name = ST_DTYPES[np_dtype]
    entries: list[Entry] = []
    for spec in tensor_specs(cfg):
        entries.append(
            Entry(
                spec.hf_name,
                st_name,
                spec.hf_shape,
                int(np.prod(spec.hf_shape)) * np_dtype.itemsize,
                lambda spec=spec: hf_tensor(model, spec, np_dtype, merge_lora=merge_lora),
            )
        )
    for name in passthrough:
        st_dt, shape, nbytes = st_src.raw_entry(name)
        entries.append(Entry(name, st_dt, shape, nbytes, lambda name=name: st_src.raw_bytes(name)))
    if sys.byteorder != "little":
        raise RuntimeError("safetensors export needs a little-endian host")

    shards = plan_shards(entries, max_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(e.nbytes for e in entries)
    show = progress if progress is not None else total > (1 << 30)

    # ---- write into a temporary sibling, then rename
    try:
        with atomic_directory(out, overwrite=True) as tmp:
            with tqdm(total=len(entries), desc=f"writing {out.name}", unit="tensor", disable=not show) as bar:
                for fname, shard in zip(names, shards):
                    write_safetensors(tmp / fname, shard, bar)
            if len(shards) > 1:
                index = {
                    "metadata": {"total_size": total, "total_parameters": sum(int(np.prod(e.shape)) for e in entries)},
                    "weight_map": {
                        e.name: f for f, shard in zip(names, shards) for e in sorted(shard, key=lambda e: e.name)
                    },
                }
                index["weight_map"] = dict(sorted(index["weight_map"].items()))
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for fname, src in tok_files.items():
                if isinstance(src, bytes):
                    (tmp / fname).write_bytes(src)
                else:
                    shutil.copyfile(src, tmp / fname)
            if gen_src is not None and gen_src.is_file():
                shutil.copyfile(gen_src, tmp / "generation_config.json")
            else:
                gen = {
                    "bos_token_id": cfg.bos_token_id,
                    "eos_token_id": cfg.eos_token_id,
                    "pad_token_id": cfg.pad_token_id,
                }
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            # config.json last: a directory without it is never mistaken for a checkpoint.
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    finally:
        if st_src is not None:
            st_src.close()
    return out


__all__ = [
    "load",
    "save",
    "read_config",
    "tensor_specs",
    "check_tensors",
    "export_problems",
    "hf_tensor",
    "iter_hf_tensors",
    "SafetensorsDir",
    "TensorSpec",
    "read_safetensors_header",
    "parse_size",
    "hf_shape",
    "LAYER_NAMES",
    "TIED_ALIASES",
    "PASSTHROUGH_PREFIXES",
    "TOP_NAMES",
    "STACKS",
    "canonical_name",
    "DEFAULT_MAX_SHARD_BYTES",
    "ST_DTYPES",
]
