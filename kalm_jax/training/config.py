"""The training configuration (an `ml_collections.ConfigDict`): defaults, and validation of user keys.

The `train.py` config (kalm_jax/configs/) builds the presets (tiny/nano/small/large) and the KaLM stage configs on
top of `default_config()`. `validate(config)` rejects unknown keys with the list of valid ones, so a typo in a
config file or an override never passes silently.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ml_collections

from kalm_jax.cli import ConfigError
from kalm_jax.parallel.mesh import DEFAULT_RULES

DEFAULT_RATIOS = (1, 2, 4, 8, 16, 32)
"""Every ratio the released serving code offers (r = 1..32), each trained: the default."""
PAPER_V3_RATIOS = (2, 8, 32, 128)
"""The ratio set the paper documents (v3 report: the SFT loss summed over r in {2, 8, 32, 128}, weight 1 each)."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    # Stage length in passes over the training groups; > 0 derives total_steps = ceil(epochs x groups /
    # data.batch_size) once the data is prepared (the paper trains one epoch per stage); 0 = use total_steps.
    c.epochs = 0.0
    # An HF T5Gemma 2 / KaLM directory, a kalm-jax model checkpoint or a training workdir; "" = from scratch.
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # from-scratch shape (ignored with init_from)
    c.model.param_dtype = "float32"  # master weights
    c.model.compute_dtype = "float32"  # "bfloat16" on accelerators
    c.model.remat = False
    c.model.remat_policy = "nothing"  # what remat keeps per layer (both stacks or per stack): kalm_jax.model.t5gemma2

    # SentencePiece model; "" = <init_from>/tokenizer.model if present, else trained on the training corpus.
    c.tokenizer = ""
    c.tokenizer_vocab_size = 8000

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = False
    c.lora.rank = 96
    c.lora.alpha = 48.0
    c.lora.targets = ("q", "k", "v", "o")
    c.lora.stacks = ("encoder", "decoder")

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""  # BEIR datasets root; "" = $KALM_DATA_DIR
    c.data.dataset = "scifact"  # BEIR dataset to mine training groups from when train_jsonl is empty
    c.data.split = "train"
    c.data.train_jsonl = ()  # FlagEmbedding-style JSONL files; () = mine from data.dataset
    c.data.num_negatives = 15
    c.data.negatives_depth = 100
    c.data.batch_size = 16  # global queries per step (split over hosts and batch shards)
    c.data.group_size = 16
    c.data.max_document_tokens = 512
    c.data.max_query_tokens = 128
    c.data.decoder_length = 0  # 0 = derived from the tokenizer and max_query_tokens
    c.data.instruction = (
        "default"  # "default" = DEFAULT_INSTRUCTION; "" or "none" = no <Instruct> line (stage 1); else the text
    )
    c.data.use_example_prompt = True
    c.data.worker_count = 0

    c.mep = ml_collections.ConfigDict()
    c.mep.ratios = DEFAULT_RATIOS
    c.mep.weights = ()  # () = 1.0 per ratio
    c.mep.ratios_per_pass = 1  # ratios scored by one decoder pass (0 = all in one pass)

    c.loss = ml_collections.ConfigDict()
    c.loss.pointwise = 1.0  # 2-way yes/no NLL
    c.loss.full_vocab = 0.0  # full-vocabulary NLL
    c.loss.distill = 0.0  # BCE against teacher P(yes)
    c.loss.listwise = 0.0  # group softmax CE over margins
    c.loss.listwise_temperature = 1.0
    c.loss.teacher_format = "prob"  # teacher scores are P(yes) ("prob") or margins/logits ("logit")

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 2e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.end_lr_ratio = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.01
    c.optimizer.clip_norm = 1.0
    c.optimizer.grad_accum_steps = 1

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.logical_axis_rules = DEFAULT_RULES

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100
    c.checkpoint.keep = 3
    c.checkpoint.keep_best = 1
    c.checkpoint.best_metric = "dev_ndcg@10"
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # 0 = only before and after training
    c.eval.dataset = "scifact"
    c.eval.split = "test"
    c.eval.num_queries = 50
    c.eval.depth = 20
    c.eval.ratio = 4
    c.eval.batch_size = 64

    c.log_every = 10
    c.tensorboard = True
    c.peak_flops_per_device = 0.0  # for MFU; 0 = a guess from the device kind
    return c


def _keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        out[name] = v
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_keys(v, name + "."))
    return out


# Numeric ranges of the settings: (kind, low, high, low inclusive); kind "int" refuses fractions and bools.
_INF = float("inf")
RANGES: dict[str, tuple[str, float, float, bool]] = {
    "seed": ("int", 0, _INF, True),
    "total_steps": ("int", 1, _INF, True),
    "epochs": ("float", 0, _INF, True),
    "tokenizer_vocab_size": ("int", 1, _INF, True),
    "lora.rank": ("int", 1, _INF, True),
    "lora.alpha": ("float", 0, _INF, False),
    "data.num_negatives": ("int", 0, _INF, True),
    "data.negatives_depth": ("int", 1, _INF, True),
    "mep.ratios_per_pass": ("int", 0, _INF, True),
    "data.batch_size": ("int", 1, _INF, True),
    "data.group_size": ("int", 1, _INF, True),
    "data.max_document_tokens": ("int", 1, _INF, True),
    "data.max_query_tokens": ("int", 1, _INF, True),
    "data.decoder_length": ("int", 0, _INF, True),
    "data.worker_count": ("int", 0, _INF, True),
    "loss.pointwise": ("float", 0, _INF, True),
    "loss.full_vocab": ("float", 0, _INF, True),
    "loss.distill": ("float", 0, _INF, True),
    "loss.listwise": ("float", 0, _INF, True),
    "loss.listwise_temperature": ("float", 0, _INF, False),
    "optimizer.lr": ("float", 0, _INF, False),
    "optimizer.warmup_steps": ("int", 0, _INF, True),
    "optimizer.end_lr_ratio": ("float", 0, 1, True),
    "optimizer.b1": ("float", 0, 1, True),
    "optimizer.b2": ("float", 0, 1, True),
    "optimizer.eps": ("float", 0, _INF, False),
    "optimizer.weight_decay": ("float", 0, _INF, True),
    "optimizer.clip_norm": ("float", 0, _INF, True),
    "optimizer.grad_accum_steps": ("int", 1, _INF, True),
    "checkpoint.every": ("int", 1, _INF, True),
    "checkpoint.keep": ("int", 1, _INF, True),
    "checkpoint.keep_best": ("int", 0, _INF, True),
    "eval.every": ("int", 0, _INF, True),
    "eval.num_queries": ("int", 0, _INF, True),
    "eval.depth": ("int", 1, _INF, True),
    "eval.ratio": ("int", 1, _INF, True),
    "eval.batch_size": ("int", 1, _INF, True),
    "log_every": ("int", 1, _INF, True),
    "peak_flops_per_device": ("float", 0, _INF, True),
}


def _range_problems(config: ml_collections.ConfigDict) -> list[str]:
    import math

    values = _keys(config)
    problems = []
    for name, (kind, lo, hi, lo_incl) in RANGES.items():
        if name not in values:
            continue
        v = values[name]
        if kind == "int":
            ok_type = not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))
        else:
            ok_type = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        if not ok_type:
            problems.append(f"{name} must be {'an integer' if kind == 'int' else 'a finite number'}, got {v!r}")
        elif not ((v >= lo if lo_incl else v > lo) and v <= hi):
            lo_s = f"{'>=' if lo_incl else '>'} {lo:g}"
            problems.append(f"{name} must be {lo_s}{f' and <= {hi:g}' if hi != _INF else ''}, got {v!r}")
    from kalm_jax.model.t5gemma2 import stack_remat_policies

    try:
        stack_remat_policies(config.model.remat_policy)
    except ValueError as e:
        problems.append(f"model.remat_policy: {e}")
    if str(config.loss.teacher_format) not in ("prob", "logit"):
        problems.append(f"loss.teacher_format must be 'prob' or 'logit', got {config.loss.teacher_format!r}")
    return problems


DTYPES = ("float32", "bfloat16")
"""Parameter and compute dtypes training accepts (fp16 is unsupported: non-finite logits)."""


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))


def _value_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Choices, lists and cross-field rules (each message names the key, the value and what is allowed)."""
    from kalm_jax.model.config import PRESETS

    problems = []
    if str(config.model.preset) not in PRESETS:
        problems.append(f"model.preset must be one of {sorted(PRESETS)}, got {config.model.preset!r}")
    for key in ("param_dtype", "compute_dtype"):
        if str(config.model[key]) not in DTYPES:
            problems.append(f"model.{key} must be one of {DTYPES}, got {config.model[key]!r}")
    sizes = {a: config.mesh[a] for a in ("data", "fsdp", "tensor")}
    for a, v in sizes.items():
        if not _is_int(v) or not (v == -1 or v >= 1):
            problems.append(f"mesh.{a} must be a positive integer or -1 (fill with the remaining devices), got {v!r}")
    if sum(1 for v in sizes.values() if v == -1) > 1:
        problems.append(f"at most one mesh axis may be -1 (fill), got {sizes}")
    ratios = tuple(config.mep.ratios)
    if not ratios:
        problems.append("mep.ratios must name at least one ratio, got ()")
    bad = [r for r in ratios if not _is_int(r) or r < 1]
    if bad:
        problems.append(f"mep.ratios must be integers >= 1, got {bad} in {ratios}")
    elif len(set(int(r) for r in ratios)) != len(ratios):
        problems.append(
            f"mep.ratios must not repeat a ratio (each is trained once; use mep.weights to weight one), got {ratios}"
        )
    weights = tuple(config.mep.weights)
    if weights and len(weights) != len(ratios):
        problems.append(f"mep.weights has {len(weights)} entries for {len(ratios)} ratios {ratios} (or () = 1.0 each)")
    elif any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in weights):
        problems.append(f"mep.weights must be finite numbers >= 0, got {weights}")
    elif weights and not any(w > 0 for w in weights):
        problems.append(
            f"mep.weights must give at least one ratio a weight > 0 (all zero trains nothing), got {weights}"
        )
    dec = config.data.decoder_length
    if _is_int(dec) and dec != 0:
        need = min_decoder_length(config)
        if dec < need:
            problems.append(
                f"data.decoder_length must be 0 (derived from the tokenizer) or at least {need} (the "
                f"decoder prompt template with data.instruction has at least {need - 1} tokens, plus one "
                f"query token), got {dec}"
            )
    return problems


def min_decoder_length(config: ml_collections.ConfigDict) -> int:
    """A lower bound of the decoder length any tokenizer needs for `config`'s prompt: one token per
    whitespace-separated piece of the template (an empty query) plus one query token."""
    from kalm_jax.text import prompts

    return len(prompts.decoder_text("", prompts.resolve_instruction(str(config.data.instruction))).split()) + 1


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` (a ValueError) naming every unknown key (with the valid keys of its section), every
    value out of its range (`RANGES`: e.g. total_steps >= 1, optimizer.lr > 0, epochs >= 0) and every invalid
    choice (model.preset, dtypes, mesh sizes, mep.ratios / mep.weights, data.decoder_length). Cheap and
    static (no devices, no files): train.py runs it before any data preparation."""
    known = _keys(default_config())
    problems = []
    for name in _keys(config):
        if name not in known:
            section = name.rsplit(".", 1)[0] if "." in name else ""
            valid = sorted(k.rsplit(".", 1)[-1] for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == section)
            problems.append(f"unknown config key {name!r}; valid keys{' in ' + section if section else ''}: {valid}")
    problems += _range_problems(config)
    if not problems:
        problems += _value_problems(config)
    if problems:
        raise ConfigError("\n".join(problems))
    if not any(float(config.loss[k]) for k in ("pointwise", "full_vocab", "distill", "listwise")):
        raise ConfigError("every loss weight is zero (loss.pointwise/full_vocab/distill/listwise)")


def resolve_total_steps(config: ml_collections.ConfigDict, num_groups: int) -> int:
    """Training steps of the run: `total_steps`, or ceil(epochs x num_groups / data.batch_size) when epochs > 0."""
    epochs = float(config.epochs)
    if epochs <= 0:
        return int(config.total_steps)
    if num_groups < 1:
        raise ValueError("epochs > 0 but the training data holds no groups")
    return max(1, math.ceil(epochs * num_groups / int(config.data.batch_size)))


def train_settings(config: ml_collections.ConfigDict, tokenizer_fingerprint: str | None = None) -> dict[str, Any]:
    """The settings a saved train state depends on ({dotted key: value}); recorded in every checkpoint.

    Resuming a run whose checkpoint recorded different values is refused (`checkpoints.SettingsMismatch`
    naming each key): the parameter/optimiser tree would not match, or would silently mean something else.
    Besides the state's structure this covers the tokenizer (`tokenizer`: its content hash, when given) and
    the data iterator (`data_settings`). The mesh is not a setting: a run resumes onto any mesh.
    """
    out: dict[str, Any] = {
        "model.param_dtype": str(config.model.param_dtype),
        "optimizer.grad_accum_steps": int(config.optimizer.grad_accum_steps),
        "optimizer.clip_norm > 0": float(config.optimizer.clip_norm) > 0,
        "lora.enabled": bool(config.lora.enabled),
    }
    if not config.init_from:
        out["model.preset"] = str(config.model.preset)
    if config.lora.enabled:
        out.update(
            {
                "lora.rank": int(config.lora.rank),
                "lora.alpha": float(config.lora.alpha),
                "lora.targets": [str(t) for t in config.lora.targets],
                "lora.stacks": [str(t) for t in config.lora.stacks],
            }
        )
    out.update(data_settings(config))
    if tokenizer_fingerprint:
        out["tokenizer"] = str(tokenizer_fingerprint)
    return out


def data_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings the saved data-iterator position means something under: the global batch and group
    sizes, the shuffle seed and the training data (the JSONL files, or the BEIR split and mining settings)."""
    out: dict[str, Any] = {
        "seed": int(config.seed),
        "data.batch_size": int(config.data.batch_size),
        "data.group_size": int(config.data.group_size),
    }
    if config.data.train_jsonl:
        out["data.train_jsonl"] = [str(Path(f).absolute()) for f in config.data.train_jsonl]
    else:
        out.update(
            {
                "data.dataset": str(config.data.dataset),
                "data.split": str(config.data.split),
                "data.num_negatives": int(config.data.num_negatives),
                "data.negatives_depth": int(config.data.negatives_depth),
            }
        )
    return out


LATER_SETTINGS = ("tokenizer", "seed", "data.")
"""Prefixes of settings recorded since a later version: a checkpoint that records none of them (written before)
is not compared on them."""


def ratio_weights(config: ml_collections.ConfigDict) -> tuple[tuple[int, float], ...]:
    ratios = tuple(int(r) for r in config.mep.ratios)
    weights = tuple(float(w) for w in config.mep.weights) or (1.0,) * len(ratios)
    return tuple(zip(ratios, weights))


__all__ = [
    "default_config",
    "validate",
    "ratio_weights",
    "resolve_total_steps",
    "train_settings",
    "data_settings",
    "min_decoder_length",
    "LATER_SETTINGS",
    "DTYPES",
    "DEFAULT_RATIOS",
    "PAPER_V3_RATIOS",
]
