"""Model configuration for T5Gemma 2 / KaLM-Reranker-V1, with presets and exact HF `config.json` mapping.

The presets hold the T5Gemma 2 checkpoints' values (transformers `models/t5gemma2`). When a checkpoint is
loaded, every value is read from its `config.json` (`ModelConfig.from_hf`); the presets are never assumed for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

SLIDING = "sliding_attention"
FULL = "full_attention"
_LAYER_TYPES = (SLIDING, FULL)

# Fields of the HF text config that this implementation models. Anything else in the HF config is kept
# verbatim in `hf_extra` so that `to_hf` writes back what `from_hf` read.
_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "rope_parameters",
    "rms_norm_eps",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "hidden_activation",
    "max_position_embeddings",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "tie_word_embeddings",
    "attention_bias",
)
_SHARED_FIELDS = tuple(f for f in _TEXT_FIELDS if f not in ("num_hidden_layers", "layer_types"))


def layer_pattern(num_layers: int, full_every: int = 6) -> tuple[str, ...]:
    """Gemma 3 pattern: layer i is global when (i + 1) % full_every == 0, else sliding."""
    return tuple(FULL if (i + 1) % full_every == 0 else SLIDING for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a T5Gemma 2 encoder-decoder (text part). Hashable, so it can be a jit static arg."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    encoder_layer_types: tuple[str, ...]
    decoder_layer_types: tuple[str, ...]
    sliding_window: int
    query_pre_attn_scalar: float = 256.0
    rope_local_theta: float = 10_000.0
    rope_local_factor: float = 1.0
    rope_global_theta: float = 1_000_000.0
    rope_global_factor: float = 8.0
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    max_position_embeddings: int = 32768
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    image_token_index: int = 256_001
    mm_tokens_per_image: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    # The untouched HF config.json (sorted JSON) when loaded from one; `to_hf` updates it in place.
    hf_extra: str | None = dataclasses.field(default=None, compare=False, repr=False)
    # Where the values were read from (for error messages only).
    source: str = dataclasses.field(default="ModelConfig", compare=False, repr=False)

    def __post_init__(self):
        """Validates every field's type and range (before anything is allocated from the config)."""
        problems = []
        for name, (lo, hi) in _INT_RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                problems.append(f"{name} must be an integer, got {v!r}")
            elif not lo <= v <= hi:
                problems.append(f"{name} must be in [{lo}, {hi}], got {v}")
        if problems:
            raise ValueError(f"{self.source}: invalid config: " + "; ".join(problems))
        for name in (
            "query_pre_attn_scalar",
            "rope_local_theta",
            "rope_local_factor",
            "rope_global_theta",
            "rope_global_factor",
            "rms_norm_eps",
            "final_logit_softcapping",
            "attn_logit_softcapping",
        ):
            v = getattr(self, name)
            if v is None and name.endswith("softcapping"):
                continue
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float, np.floating, np.integer))
                or not math.isfinite(v)
                or v <= 0
            ):
                problems.append(
                    f"{name} must be a finite number > 0{' (or null)' if name.endswith('softcapping') else ''}, "
                    f"got {v!r}"
                )
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if isinstance(getattr(self, name), int) and getattr(self, name) >= self.vocab_size:
                problems.append(f"{name} {getattr(self, name)} is not below vocab_size {self.vocab_size}")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        for stack in ("encoder_layer_types", "decoder_layer_types"):
            types = getattr(self, stack)
            if not types:
                problems.append(f"{stack} is empty")
            bad = sorted({t for t in types if t not in _LAYER_TYPES})
            if bad:
                problems.append(f"{stack} has unknown layer types {bad}; expected {list(_LAYER_TYPES)}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            problems.append(f"hidden_activation {self.hidden_activation!r} is not supported (gelu_pytorch_tanh)")
        if problems:
            raise ValueError(f"{self.source}: invalid config: " + "; ".join(problems))

    @property
    def num_encoder_layers(self) -> int:
        return len(self.encoder_layer_types)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder_layer_types)

    @property
    def attn_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: per-stack non-embedding, embedding (incl. eoi vector) and total (text only)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        per_layer = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2 + 2 * d + 4 * h + 3 * h * i
        enc = per_layer * self.num_encoder_layers + h
        dec = per_layer * self.num_decoder_layers + h
        emb = self.vocab_size * h
        return {"encoder": enc, "decoder": dec, "embedding": emb, "total": enc + dec + emb + h}

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF mapping
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Builds a config from a parsed HF `config.json` of model type `t5gemma2`.

        Raises ValueError naming `source` when the file is of another model type or lacks required fields.
        """
        model_type = hf.get("model_type")
        if model_type != "t5gemma2":
            raise ValueError(
                f"{source}: model_type is {model_type!r}, expected 't5gemma2' "
                "(a T5Gemma 2 or KaLM-Reranker-V1 checkpoint)"
            )
        enc = hf.get("encoder")
        dec = hf.get("decoder")
        if not isinstance(enc, Mapping) or not isinstance(dec, Mapping):
            raise ValueError(f"{source}: expected nested 'encoder' and 'decoder' sections")
        text = enc.get("text_config", enc)
        if not isinstance(text, Mapping):
            raise ValueError(f"{source}: encoder.text_config is missing")
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
        for part_name, part in (("encoder.text_config", text), ("decoder", dec)):
            missing = [k for k in required if k not in part]
            if missing:
                raise ValueError(f"{source}: {part_name} lacks required fields {missing}")
        mismatched = []
        for key in _SHARED_FIELDS:
            a, b = text.get(key), dec.get(key)
            if key in text and key in dec and _norm(a) != _norm(b):
                mismatched.append(f"{key}: encoder {a!r} vs decoder {b!r}")
        if mismatched:
            raise ValueError(
                f"{source}: encoder and decoder text configs differ in fields this implementation shares: {mismatched}"
            )
        if text.get("tie_word_embeddings", True) is False or hf.get("tie_word_embeddings", True) is False:
            raise ValueError(f"{source}: tie_word_embeddings=false is not supported (T5Gemma 2 ties them)")
        if text.get("attention_bias", False):
            raise ValueError(f"{source}: attention_bias=true is not supported")

        t, d, e = "encoder.text_config", "decoder", "encoder"

        def i(part, where, key, default=None):
            return _int_field(part.get(key, default) if default is not None else part[key], source, f"{where}.{key}")

        def f(part, where, key, default):
            return _float_field(part.get(key, default), source, f"{where}.{key}")

        eos = dec.get("eos_token_id", hf.get("eos_token_id", 1))
        if isinstance(eos, (list, tuple)):
            if not eos:
                raise ValueError(f"{source}: decoder.eos_token_id is an empty list")
            eos = eos[0]
        window = i(text, t, "sliding_window", 4096)
        local = _rope(text, SLIDING, f(text, t, "rope_local_base_freq", 10_000.0), source)
        glob = _rope(text, FULL, f(text, t, "rope_theta", 1_000_000.0), source)
        act = text.get("hidden_activation", "gelu_pytorch_tanh")
        if not isinstance(act, str):
            raise ValueError(f"{source}: {t}.hidden_activation must be a string, got {act!r}")
        try:
            extra = json.dumps(hf, sort_keys=True)
        except (RecursionError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: cannot be stored ({type(err).__name__}: {err})") from None
        cfg = cls(
            vocab_size=i(text, t, "vocab_size"),
            hidden_size=i(text, t, "hidden_size"),
            intermediate_size=i(text, t, "intermediate_size"),
            num_heads=i(text, t, "num_attention_heads"),
            num_kv_heads=i(text, t, "num_key_value_heads"),
            head_dim=i(text, t, "head_dim"),
            encoder_layer_types=_layer_types(text, source, t),
            decoder_layer_types=_layer_types(dec, source, d),
            sliding_window=window,
            query_pre_attn_scalar=f(text, t, "query_pre_attn_scalar", 256),
            rope_local_theta=local[0],
            rope_local_factor=local[1],
            rope_global_theta=glob[0],
            rope_global_factor=glob[1],
            rms_norm_eps=f(text, t, "rms_norm_eps", 1e-6),
            final_logit_softcapping=_opt_float(
                dec.get("final_logit_softcapping"), source, "decoder.final_logit_softcapping"
            ),
            attn_logit_softcapping=_opt_float(
                dec.get("attn_logit_softcapping"), source, "decoder.attn_logit_softcapping"
            ),
            max_position_embeddings=i(text, t, "max_position_embeddings", 32768),
            pad_token_id=_int_field(dec.get("pad_token_id", hf.get("pad_token_id", 0)), source, "decoder.pad_token_id"),
            eos_token_id=_int_field(eos, source, "decoder.eos_token_id"),
            bos_token_id=_int_field(dec.get("bos_token_id", hf.get("bos_token_id", 2)), source, "decoder.bos_token_id"),
            boi_token_index=i(enc, e, "boi_token_index", 255_999),
            eoi_token_index=_int_field(
                enc.get("eoi_token_index", hf.get("eoi_token_index", 256_000)), source, "encoder.eoi_token_index"
            ),
            image_token_index=_int_field(
                hf.get("image_token_index", enc.get("image_token_index", 256_001)), source, "image_token_index"
            ),
            mm_tokens_per_image=i(enc, e, "mm_tokens_per_image", 256),
            hidden_activation=act,
            hf_extra=extra,
            source=source,
        )
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (model type `t5gemma2`) that transformers loads for this config."""
        base = json.loads(self.hf_extra) if self.hf_extra else {}
        text = self._hf_text(self.encoder_layer_types)
        dec_text = self._hf_text(self.decoder_layer_types)
        enc = dict(base.get("encoder", {}))
        old_text = dict(enc.get("text_config", {}))
        old_text.update(text)
        old_text.setdefault("model_type", "t5gemma2_text")
        enc.update(
            text_config=old_text,
            boi_token_index=self.boi_token_index,
            eoi_token_index=self.eoi_token_index,
            image_token_index=self.image_token_index,
            mm_tokens_per_image=self.mm_tokens_per_image,
            tie_word_embeddings=True,
        )
        enc.setdefault("model_type", "t5gemma2_encoder")
        if "vision_config" not in enc:
            enc["vision_config"] = dict(_TINY_VISION)
        dec = dict(base.get("decoder", {}))
        dec.update(dec_text)
        dec.setdefault("model_type", "t5gemma2_decoder")
        out = dict(base)
        out.update(
            model_type="t5gemma2",
            architectures=base.get("architectures", ["T5Gemma2ForConditionalGeneration"]),
            encoder=enc,
            decoder=dec,
            is_encoder_decoder=True,
            tie_word_embeddings=True,
            image_token_index=self.image_token_index,
            eoi_token_index=self.eoi_token_index,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.bos_token_id,
            vocab_size=self.vocab_size,
        )
        out.setdefault("dtype", "bfloat16")
        return out

    def _hf_text(self, layer_types: tuple[str, ...]) -> dict[str, Any]:
        local = {"rope_type": "default", "rope_theta": self.rope_local_theta}
        if self.rope_local_factor != 1.0:
            local = {"rope_type": "linear", "factor": self.rope_local_factor, "rope_theta": self.rope_local_theta}
        glob = {"rope_type": "default", "rope_theta": self.rope_global_theta}
        if self.rope_global_factor != 1.0:
            glob = {"rope_type": "linear", "factor": self.rope_global_factor, "rope_theta": self.rope_global_theta}
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": len(layer_types),
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": _int_if_whole(self.query_pre_attn_scalar),
            "sliding_window": self.sliding_window,
            "layer_types": list(layer_types),
            "rope_parameters": {SLIDING: local, FULL: glob},
            "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "hidden_activation": self.hidden_activation,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "dropout_rate": 0.0,
        }


_TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    vision_use_head=False,
    model_type="siglip_vision_model",
)


def _norm(v):
    return json.dumps(v, sort_keys=True)


def _int_if_whole(v: float):
    return int(v) if float(v).is_integer() else float(v)


# Inclusive ranges of the integer fields: generous bounds far above every released model, low enough that a
# typo (10^6 layers, a 2^40 window) is an error before anything is allocated.
MAX_LAYERS = 1024
_INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 20),
    "num_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "head_dim": (2, 4096),
    "sliding_window": (1, 1 << 24),
    "max_position_embeddings": (1, 1 << 24),
    "pad_token_id": (0, 1 << 24),
    "eos_token_id": (0, 1 << 24),
    "bos_token_id": (0, 1 << 24),
    "boi_token_index": (0, 1 << 24),
    "eoi_token_index": (0, 1 << 24),
    "image_token_index": (0, 1 << 24),
    "mm_tokens_per_image": (0, 1 << 16),
}


def _int_field(v, source: str, where: str) -> int:
    """An integer field of config.json: an int (or a whole float); bools, fractions and strings are errors."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"{source}: {where} must be an integer, got {v!r}")
    return int(v)


def _float_field(v, source: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{source}: {where} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{source}: {where} must be finite, got {v!r}")
    return float(v)


def _opt_float(v, source: str = "config.json", where: str = "value") -> float | None:
    return None if v is None else _float_field(v, source, where)


def _rope(
    text: Mapping[str, Any],
    layer_type: str,
    default_theta: float,
    source: str = "config.json",
) -> tuple[float, float]:
    params = text.get("rope_parameters") or {}
    entry = params.get(layer_type) if isinstance(params, Mapping) else None
    if entry is None and layer_type == FULL and text.get("rope_scaling"):
        if not isinstance(text["rope_scaling"], Mapping):
            raise ValueError(f"{source}: rope_scaling must be an object, got {text['rope_scaling']!r}")
        entry = dict(text["rope_scaling"], rope_theta=default_theta)
    if entry is None:
        return default_theta, 1.0
    if not isinstance(entry, Mapping):
        raise ValueError(f"{source}: rope_parameters.{layer_type} must be an object, got {entry!r}")
    rope_type = entry.get("rope_type", entry.get("type", "default"))
    theta = _float_field(entry.get("rope_theta", default_theta), source, f"rope_parameters.{layer_type}.rope_theta")
    if rope_type == "default":
        return theta, 1.0
    if rope_type == "linear":
        return theta, _float_field(entry.get("factor", 1.0), source, f"rope_parameters.{layer_type}.factor")
    raise ValueError(f"{source}: rope_type {rope_type!r} for {layer_type} is not supported (default, linear)")


def _layer_types(part: Mapping[str, Any], source: str, name: str) -> tuple[str, ...]:
    n = _int_field(part["num_hidden_layers"], source, f"{name}.num_hidden_layers")
    if not 1 <= n <= MAX_LAYERS:
        raise ValueError(f"{source}: {name}.num_hidden_layers must be in [1, {MAX_LAYERS}], got {n}")
    types = part.get("layer_types")
    if types is None:
        every = _int_field(
            part.get("_sliding_window_pattern", part.get("sliding_window_pattern", 6)),
            source,
            f"{name}.sliding_window_pattern",
        )
        if every < 1:
            raise ValueError(f"{source}: {name}.sliding_window_pattern must be >= 1, got {every}")
        return layer_pattern(n, every)
    if not isinstance(types, (list, tuple)) or not all(isinstance(x, str) for x in types):
        raise ValueError(f"{source}: {name}.layer_types must be a list of strings, got {types!r}")
    types = tuple(types)
    if len(types) != n:
        raise ValueError(f"{source}: {name}.layer_types has {len(types)} entries for {n} layers")
    return types


def _preset(hidden, inter, layers, heads, kv, window, max_pos) -> ModelConfig:
    return ModelConfig(
        vocab_size=262_144,
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=256,
        encoder_layer_types=layer_pattern(layers),
        decoder_layer_types=layer_pattern(layers),
        sliding_window=window,
        max_position_embeddings=max_pos,
    )


PRESETS: dict[str, ModelConfig] = {
    # t5gemma-2-270m-270m (read from a published config).
    "nano": _preset(640, 2048, 18, 4, 1, 512, 32768),
    # t5gemma-2-1b-1b and 4b-4b: the Gemma 3 1B / 4B shapes, inferred, not read from their gated configs.
    # Real checkpoints are always configured from their own config.json.
    "small": _preset(1152, 6912, 26, 4, 1, 512, 32768),
    "large": _preset(2560, 10240, 34, 8, 4, 1024, 131072),
    # A few-hundred-kilobyte model for tests and CPU demos (vocab fits a trained SentencePiece model).
    "tiny": ModelConfig(
        vocab_size=8192,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        encoder_layer_types=(SLIDING, FULL),
        decoder_layer_types=(SLIDING, FULL),
        sliding_window=16,
        query_pre_attn_scalar=32.0,
        max_position_embeddings=2048,
        boi_token_index=8189,
        eoi_token_index=8190,
        image_token_index=8191,
        mm_tokens_per_image=4,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}") from None


# ---------------------------------------------------------------------- dtypes
_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
}


def parse_dtype(dtype) -> jnp.dtype:
    """Maps 'bfloat16'/'bf16'/'float32'/'fp32' or a dtype object to a jnp dtype; fp16 and others are errors."""
    if isinstance(dtype, str):
        key = dtype.lower().replace("jnp.", "").replace("torch.", "")
        if key in ("float16", "fp16", "half", "f16"):
            raise ValueError(
                "float16 is unsupported: T5Gemma 2 produces non-finite logits in fp16; use 'bfloat16' or 'float32'"
            )
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of 'bfloat16', 'float32'")
        return jnp.dtype(_DTYPES[key])
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of 'bfloat16', 'float32'") from None
    if dt == jnp.float16:
        raise ValueError(
            "float16 is unsupported: T5Gemma 2 produces non-finite logits in fp16; use 'bfloat16' or 'float32'"
        )
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"unsupported dtype {dt}; use 'bfloat16' or 'float32'")
    return dt


def embed_scale(hidden_size: int, dtype) -> np.ndarray:
    """sqrt(H) rounded to `dtype`, as HF does (bf16: 25.25 for H=640)."""
    return np.asarray(math.sqrt(hidden_size), dtype=jnp.dtype(dtype))
