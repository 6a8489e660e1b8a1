"""Hugging Face `t5gemma2` checkpoints ⇄ the NNX model: the name/layout mapping as data, and `load`.

On-disk (Hub) names: `model.encoder.embed_tokens.{weight,eoi_embedding}`, `model.encoder.layers.{i}.*`,
`model.encoder.norm.weight`, `model.decoder.layers.{i}.*`, `model.decoder.norm.weight`; the decoder
embedding and `lm_head.out_proj.weight` are tied aliases. PyTorch Linear weights are [out, in]; ours are
einsum kernels ([H, N, D] for q, [N, D, H] for o, [H, I] for gate/up, [I, H] for down).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kalm_jax.atomic import atomic_directory
from kalm_jax.config import ModelConfig, parse_dtype
from kalm_jax.model import T5Gemma2, _lora_delta, abstract_model, stack_param_shapes

# HF per-layer suffix -> our stacked-parameter name.
LAYER_NAMES: dict[str, str] = {
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "pre_self_attn_layernorm.weight": "pre_attn_norm",
    "post_self_attn_layernorm.weight": "post_attn_norm",
    "pre_feedforward_layernorm.weight": "pre_ffw_norm",
    "post_feedforward_layernorm.weight": "post_ffw_norm",
    "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
}
TOP_NAMES: dict[str, tuple[str, ...]] = {
    "model.encoder.embed_tokens.weight": ("embedding",),
    "model.encoder.embed_tokens.eoi_embedding": ("eoi_embedding",),
    "model.encoder.norm.weight": ("encoder_norm",),
    "model.decoder.norm.weight": ("decoder_norm",),
}
TIED_ALIASES = ("model.decoder.embed_tokens.weight", "model.decoder.embed_tokens.eoi_embedding",
                "lm_head.out_proj.weight")
PASSTHROUGH_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")
STACKS = {"encoder": "model.encoder.layers", "decoder": "model.decoder.layers"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: its name, PyTorch shape and where it lives in the NNX model."""

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]          # attribute path in the model, e.g. ("encoder", "q")
    layer: int | None              # index into the stacked leading axis, or None

    def to_ours(self, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return _to_ours(self.path[-1], t, cfg)

    def to_hf(self, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return _to_hf(self.path[-1], t, cfg)


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """All text tensors of the Hub layout for `cfg`, in a stable order (tied aliases omitted)."""
    h, n, k, d, i, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    shapes = {"q": (n * d, h), "k": (k * d, h), "v": (k * d, h), "o": (h, n * d), "q_norm": (d,),
              "k_norm": (d,), "pre_attn_norm": (h,), "post_attn_norm": (h,), "pre_ffw_norm": (h,),
              "post_ffw_norm": (h,), "gate": (i, h), "up": (i, h), "down": (h, i)}
    specs = [TensorSpec("model.encoder.embed_tokens.weight", (v, h), ("embedding",), None),
             TensorSpec("model.encoder.embed_tokens.eoi_embedding", (h,), ("eoi_embedding",), None)]
    for stack, prefix in STACKS.items():
        for layer in range(len(getattr(cfg, f"{stack}_layer_types"))):
            for suffix, ours in LAYER_NAMES.items():
                specs.append(TensorSpec(f"{prefix}.{layer}.{suffix}", shapes[ours], (stack, ours), layer))
        specs.append(TensorSpec(f"model.{stack}.norm.weight", (h,), (f"{stack}_norm",), None))
    return specs


def _to_ours(name: str, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    h, d = cfg.hidden_size, cfg.head_dim
    if name == "q":
        return t.T.reshape(h, cfg.num_heads, d)
    if name in ("k", "v"):
        return t.T.reshape(h, cfg.num_kv_heads, d)
    if name == "o":
        return t.T.reshape(cfg.num_heads, d, h)
    if name in ("gate", "up", "down"):
        return t.T
    return t


def _to_hf(name: str, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if name in ("q", "k", "v"):
        return t.reshape(t.shape[0], -1).T
    if name == "o":
        return t.reshape(-1, t.shape[-1]).T
    if name in ("gate", "up", "down"):
        return t.T
    return t


def hf_shape(name: str, ours: Sequence[int]) -> tuple[int, ...]:
    """PyTorch shape of one layer's parameter `name` whose (unstacked) NNX shape is `ours`."""
    ours = tuple(int(x) for x in ours)
    if name in ("q", "k", "v") and len(ours) == 3:
        return (ours[1] * ours[2], ours[0])
    if name == "o" and len(ours) == 3:
        return (ours[2], ours[0] * ours[1])
    if name in ("gate", "up", "down"):
        return ours[::-1]
    return ours


def canonical_name(name: str) -> str:
    """Maps in-memory transformers names (`model.encoder.text_model.*`) to the Hub layout."""
    return name.replace("model.encoder.text_model.", "model.encoder.", 1)


# ---------------------------------------------------------------------- safetensors access
class SafetensorsDir:
    """Read access to the safetensors of an HF checkpoint directory (single file or sharded index)."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: not a checkpoint directory")
        index = self.root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
            self.files = {name: self.root / f for name, f in weight_map.items()}
            missing = sorted({str(p) for p in self.files.values() if not p.exists()})
            if missing:
                raise FileNotFoundError(f"{index} names shard files that do not exist: {missing[:5]}")
        else:
            shards = sorted(self.root.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{self.root}: no *.safetensors files (and no model.safetensors.index.json)")
            from safetensors import safe_open
            self.files = {}
            for shard in shards:
                with safe_open(shard, framework="np") as f:
                    for name in f.keys():
                        self.files[name] = shard
        from safetensors import safe_open
        self._safe_open = safe_open
        self._handles: dict[Path, object] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {}

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = self._safe_open(file, framework="np")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.files)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        if name not in self._shapes:
            sl = self._handle(self.files[name]).get_slice(name)
            self._shapes[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        return self._handle(self.files[name]).get_tensor(name)

    def raw_entry(self, name: str) -> tuple[str, tuple[int, ...], int]:
        """(safetensors dtype string, shape, byte length) of `name`, read from the file header only."""
        header, _ = read_safetensors_header(self.files[name])
        e = header[name]
        begin, end = e["data_offsets"]
        return e["dtype"], tuple(e["shape"]), end - begin

    def raw_bytes(self, name: str) -> bytes:
        """The stored bytes of `name`, untouched (no dtype decoding): for byte-exact carrying."""
        file = self.files[name]
        header, data_start = read_safetensors_header(file)
        begin, end = header[name]["data_offsets"]
        with open(file, "rb") as f:
            f.seek(data_start + begin)
            data = f.read(end - begin)
        if len(data) != end - begin:
            raise ValueError(f"{file}: tensor {name} is truncated ({len(data)} of {end - begin} bytes)")
        return data

    def close(self):
        self._handles.clear()


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Reads and validates `config.json` of an HF checkpoint directory."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: missing (an HF checkpoint directory needs config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
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


def load(path: str | os.PathLike, dtype="float32", *, compute_dtype=None, progress: bool | None = None,
         ) -> tuple[ModelConfig, T5Gemma2]:
    """Loads an HF T5Gemma 2 / KaLM-Reranker-V1 checkpoint directory into the NNX model.

    Args:
      path: directory with `config.json` and `model.safetensors` (or shards + `model.safetensors.index.json`).
      dtype: parameter dtype ('float32' or 'bfloat16'); also the compute dtype unless `compute_dtype` is set.
      progress: show a progress bar (default: for checkpoints over 1 GiB).
    Returns:
      (config, model). Vision-tower tensors are not loaded; their names are kept in
      `model.hf_passthrough` (and the source directory in `model.hf_source`) so `save` can carry them.
    Raises:
      ValueError naming every missing, unexpected or mis-shaped tensor, or a wrong model type.
    """
    param_dtype = parse_dtype(dtype)
    cfg = read_config(path)
    st = SafetensorsDir(path)
    try:
        shapes = {name: st.shape_dtype(name)[0] for name in st.names()}
        problems, passthrough = check_tensors(cfg, shapes)
        if problems:
            head = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ValueError(f"{path}: checkpoint does not match its config.json ({len(problems)} problems):\n  "
                             f"{head}{more}")
        model = abstract_model(cfg, param_dtype=param_dtype, dtype=compute_dtype)
        by_canon = {canonical_name(n): n for n in st.names()}
        np_dtype = _np_dtype(param_dtype)
        specs = tensor_specs(cfg)
        total = sum(int(np.prod(s.hf_shape)) for s in specs) * np_dtype.itemsize
        show = progress if progress is not None else total > (1 << 30)
        buffers: dict[tuple[str, ...], np.ndarray] = {}
        for spec in tqdm(specs, desc=f"loading {Path(path).name}", unit="tensor", disable=not show):
            value = spec.to_ours(st.get(by_canon[spec.hf_name]), cfg).astype(np_dtype, copy=False)
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


def _get(model, path: tuple[str, ...]) -> nnx.Variable:
    obj = model
    for p in path:
        obj = getattr(obj, p)
    return obj


def _set(model, path: tuple[str, ...], value: np.ndarray) -> None:
    _get(model, path).set_value(jnp.asarray(value))


def read_safetensors_header(file: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data buffer starts."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{file}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"{file}: not a safetensors file (header length {n})")
        raw = f.read(n)
    try:
        return json.loads(raw), 8 + n
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: corrupt safetensors header ({e})") from None


# ---------------------------------------------------------------------- export
ST_DTYPES: dict[np.dtype, str] = {
    np.dtype(jnp.float32): "F32", np.dtype(jnp.bfloat16): "BF16", np.dtype(np.float16): "F16",
    np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
}
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
"""Hub convention: shards of at most 5 GB (a tensor larger than the limit gets a shard of its own)."""
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
"""Tokenizer files copied beside an exported checkpoint when they exist beside its source."""


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
            problems.append(f"parameter {'.'.join(spec.path)} has shape {got}, but the config needs {want} "
                            f"(exported as {spec.hf_name.replace('.0.', '.{i}.')})")
    for stack in ("encoder", "decoder"):
        ls = getattr(model, stack)
        for name in ls.lora_targets:
            w = tuple(getattr(ls, name).get_value().shape)
            a = tuple(getattr(ls, f"{name}_lora_a").get_value().shape)
            b = tuple(getattr(ls, f"{name}_lora_b").get_value().shape)
            n_in = len(a) - 2
            if a[0] != w[0] or b[0] != w[0] or a[1:-1] != w[1:1 + n_in] or b[2:] != w[1 + n_in:] or a[-1] != b[1]:
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
            delta = _lora_delta(a, b, (1, *value.shape), stack.lora_scale)[0]
            value = (value.astype(jnp.float32) + delta).astype(value.dtype)
    out = spec.to_hf(np.asarray(value), cfg)
    if dtype is not None:
        out = out.astype(_np_dtype(parse_dtype(dtype)), copy=False)
    return np.ascontiguousarray(out)


def iter_hf_tensors(model: T5Gemma2, dtype="bfloat16", *, merge_lora: bool = True,
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (Hub name, PyTorch-layout numpy tensor in `dtype`) for every text tensor, one at a time.

    LoRA adapters are folded into their base weights on the fly (the model itself is not changed).
    """
    for spec in tensor_specs(model.config):
        yield spec.hf_name, hf_tensor(model, spec, dtype, merge_lora=merge_lora)


@dataclasses.dataclass
class _Entry:
    """One tensor of the export plan: its name, safetensors dtype/shape/size and how to produce its bytes."""

    name: str
    st_dtype: str
    shape: tuple[int, ...]
    nbytes: int
    produce: Callable[[], np.ndarray | bytes]


def _write_safetensors(path: Path, entries: Sequence[_Entry], bar) -> None:
    """Writes a safetensors file tensor by tensor: the header is known in advance, so no shard is ever
    held in memory whole (the `safetensors` library's writers need every tensor of a file at once)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.st_dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            data = e.produce()
            if isinstance(data, np.ndarray):
                if data.nbytes != e.nbytes or tuple(data.shape) != e.shape:
                    raise RuntimeError(f"{e.name}: produced shape {data.shape} ({data.nbytes} bytes), "
                                       f"planned {e.shape} ({e.nbytes} bytes)")
                if e.st_dtype in ("F32", "BF16", "F16", "F64") and not np.isfinite(data.astype(np.float32, copy=False)).all():
                    raise ValueError(f"tensor {e.name} holds non-finite values (NaN/inf); refusing to export it")
                data.tofile(f)
            else:
                if len(data) != e.nbytes:
                    raise RuntimeError(f"{e.name}: {len(data)} bytes, planned {e.nbytes}")
                f.write(data)
            bar.update(1)
        f.flush()
        os.fsync(f.fileno())


def _shard(entries: Sequence[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Greedy in-order packing into shards of at most `max_bytes` (an oversized tensor gets its own shard)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def parse_size(size: int | str) -> int:
    """Byte count from an int or a string like '5GB', '500MB', '2GiB', '1000'."""
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
                 "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
        for unit, mult in units.items():
            if text.endswith(unit):
                try:
                    value = int(float(text[: -len(unit)]) * mult)
                except ValueError:
                    raise ValueError(f"cannot parse size {size!r} (e.g. '5GB', '500MB', '2GiB')") from None
                break
        else:
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"cannot parse size {size!r} (e.g. '5GB', '500MB', '2GiB')") from None
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


def find_tokenizer_files(*dirs: str | os.PathLike | None) -> dict[str, Path]:
    """Tokenizer files (`TOKENIZER_FILES`) found in the first of `dirs` that has any."""
    for d in dirs:
        if d is None or not Path(d).is_dir():
            continue
        found = {n: Path(d) / n for n in TOKENIZER_FILES if (Path(d) / n).is_file()}
        if found:
            return found
    return {}


def _tokenizer_files(tokenizer) -> dict[str, Path | bytes]:
    """`tokenizer` (a kalm_jax Tokenizer, a tokenizer.model file or a directory) -> files to write."""
    if hasattr(tokenizer, "_proto_bytes"):
        return {"tokenizer.model": tokenizer._proto_bytes}
    p = Path(tokenizer)
    if p.is_file():
        return {"tokenizer.model" if p.suffix == ".model" else p.name: p}
    if p.is_dir():
        found = find_tokenizer_files(p)
        if found:
            return dict(found)
        raise FileNotFoundError(f"{p}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    raise FileNotFoundError(f"{p}: tokenizer not found")


def _vision_config(source: Path) -> dict | None:
    try:
        enc = json.loads((source / "config.json").read_text()).get("encoder", {})
    except (OSError, json.JSONDecodeError):
        return None
    return enc.get("vision_config")


def save(model: T5Gemma2, config: ModelConfig | None, out_dir: str | os.PathLike, *, dtype="bfloat16",
         max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES, tokenizer=None, overwrite: bool = False,
         vision_from: str | os.PathLike | bool | None = None, merge_lora: bool = True,
         progress: bool | None = None) -> Path:
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
      tokenizer: a `kalm_jax.tokenizer.Tokenizer`, a `tokenizer.model` file or a directory with tokenizer
        files; None copies the tokenizer files found beside the model's HF source, if any.
      vision_from: HF directory whose vision-tower/projector tensors (and `vision_config`) are carried
        byte-for-byte; None uses the tensors recorded at import (`model.hf_passthrough` from
        `model.hf_source`); False exports text only. A text-only checkpoint loads in transformers, which
        then initialises the unused vision tower randomly (with a warning); text outputs are unaffected.
      progress: per-tensor progress bar (default: for exports over 1 GiB).
    Returns:
      The output directory.
    Raises:
      FileExistsError (out_dir exists, overwrite False), ValueError naming every mis-shaped parameter or
      a missing passthrough tensor, all before anything is written.
    """
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
        raise ValueError(f"cannot export to {out}: the model does not match the config "
                         f"({len(problems)} problems):\n  " + "\n  ".join(problems))
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
                raise FileNotFoundError(f"{source}: the HF checkpoint this model was imported from is gone, so its "
                                        f"{len(passthrough)} vision tensors cannot be carried; pass vision_from= "
                                        f"(--vision-from) another copy, or vision_from=False (--text-only)")
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
        tok_files = _tokenizer_files(tokenizer)
    elif source is not None:
        tok_files = dict(find_tokenizer_files(source))
    gen_src = source / "generation_config.json" if source is not None else None

    st_name = ST_DTYPES[np_dtype]
    entries: list[_Entry] = []
    for spec in tensor_specs(cfg):
        entries.append(_Entry(spec.hf_name, st_name, spec.hf_shape, int(np.prod(spec.hf_shape)) * np_dtype.itemsize,
                              lambda spec=spec: hf_tensor(model, spec, np_dtype, merge_lora=merge_lora)))
    for name in passthrough:
        st_dt, shape, nbytes = st_src.raw_entry(name)
        entries.append(_Entry(name, st_dt, shape, nbytes, lambda name=name: st_src.raw_bytes(name)))
    if sys.byteorder != "little":
        raise RuntimeError("safetensors export needs a little-endian host")

    shards = _shard(entries, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(e.nbytes for e in entries)
    show = progress if progress is not None else total > (1 << 30)

    # ---- write into a temporary sibling, then rename
    try:
        with atomic_directory(out, overwrite=True) as tmp:
            with tqdm(total=len(entries), desc=f"writing {out.name}", unit="tensor", disable=not show) as bar:
                for fname, shard in zip(names, shards):
                    _write_safetensors(tmp / fname, shard, bar)
            if len(shards) > 1:
                index = {"metadata": {"total_size": total,
                                      "total_parameters": sum(int(np.prod(e.shape)) for e in entries)},
                         "weight_map": {e.name: f for f, shard in zip(names, shards) for e in sorted(shard, key=lambda e: e.name)}}
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
                gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                       "pad_token_id": cfg.pad_token_id}
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            # config.json last: a directory without it is never mistaken for a checkpoint.
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    finally:
        if st_src is not None:
            st_src.close()
    return out


__all__ = ["load", "save", "read_config", "tensor_specs", "check_tensors", "export_problems", "hf_tensor",
           "iter_hf_tensors", "SafetensorsDir", "TensorSpec", "read_safetensors_header", "find_tokenizer_files",
           "parse_size", "hf_shape", "LAYER_NAMES", "TIED_ALIASES", "PASSTHROUGH_PREFIXES", "TOKENIZER_FILES"]
