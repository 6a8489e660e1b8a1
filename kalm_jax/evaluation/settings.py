"""The evaluation sweep's settings: parsed and validated from the `configs/eval.py` ConfigDict."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kalm_jax.configs import eval as eval_config
from kalm_jax.inference.engine import DEVICE_STATES
from kalm_jax.inference.states import STORAGE
from kalm_jax.model import quantization
from kalm_jax.text import prompts

DEFAULT_LABEL, NONE_LABEL = "default", "none"

#: Settings the numbers depend on: an output dir whose results used other values is refused.
IDENTITY_FIELDS = (
    "split",
    "first_stage",
    "top_k",
    "max_queries",
    "max_document_tokens",
    "max_query_tokens",
    "storage",
    "store_ratio",
    "system",
    "cascade",
    "dtype",
    "relevance_level",
    "on_unknown_docs",
)


class SweepConfigError(ValueError):
    """The sweep's settings are invalid or disagree with the output directory's earlier results."""


def _list(value, sep: str = ",") -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(sep) if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


@dataclasses.dataclass
class Settings:
    """The parsed sweep configuration. Every field's default and meaning are in the package's `configs/eval.py`
    (the one place they are written); `from_config` fills what a caller leaves out from there."""

    data_dir: Path
    datasets: list[str]
    output_dir: Path
    checkpoints: list[str]
    ratios: list[int]
    instructions: list[str]
    split: str
    first_stage: str
    top_k: int
    max_queries: int
    tokenizer: str
    max_document_tokens: int
    max_query_tokens: int
    storage: str
    store_dir: Path | None
    store_ratio: int
    on_stale: str
    store_lock_timeout: float
    system: str
    cascade: str
    dtype: str
    quantization: str
    device_states: str
    relevance_level: int
    on_unknown_docs: str
    batch_pairs: int
    encode_batch_size: int
    shard_size: int
    progress: bool
    report: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Settings:
        """From an ml_collections ConfigDict (or a dict); list fields accept lists or comma-separated strings
        (instructions: a list, or a string separated by ``|`` since instructions contain commas)."""
        given = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        c = {**dict(eval_config.get_config().items()), **given}
        checkpoints = _list(c.get("checkpoints")) + _list(c.get("checkpoint"))
        try:
            ratios = [int(r) for r in _list(c.get("ratios", "1"))]
        except ValueError:
            raise SweepConfigError(f"ratios must be integers, got {c.get('ratios')!r}") from None
        if not ratios or any(r < 1 for r in ratios):
            raise SweepConfigError(f"ratios must be positive integers, got {c.get('ratios')!r}")
        for name in ("data_dir", "output_dir"):
            if not c.get(name):
                raise SweepConfigError(f"config.{name} is required")
        datasets = _list(c.get("datasets"))
        if not datasets:
            raise SweepConfigError("config.datasets is empty: name at least one dataset folder under data_dir")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {
            k: v
            for k, v in c.items()
            if k in known
            and k not in ("data_dir", "datasets", "output_dir", "checkpoints", "ratios", "instructions", "store_dir")
        }
        s = cls(
            data_dir=Path(c["data_dir"]),
            datasets=datasets,
            output_dir=Path(c["output_dir"]),
            checkpoints=list(dict.fromkeys(checkpoints)),
            ratios=sorted(set(ratios)),
            instructions=_list(c.get("instructions", DEFAULT_LABEL), "|") or [DEFAULT_LABEL],
            store_dir=Path(c["store_dir"]) if c.get("store_dir") else None,
            **extra,
        )
        s.validate()
        return s

    def validate(self) -> None:
        """Raises SweepConfigError naming the first invalid field (type, range, or contradiction)."""
        minimum = {
            "top_k": 1,
            "max_queries": 0,
            "max_document_tokens": 1,
            "max_query_tokens": 1,
            "relevance_level": 0,
            "batch_pairs": 1,
            "encode_batch_size": 1,
            "shard_size": 1,
            "store_ratio": 0,
        }
        for name, lo in minimum.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SweepConfigError(f"{name} must be an integer, got {v!r}")
            if v < lo:
                meaning = {
                    "max_queries": " (0 = all queries)",
                    "relevance_level": " (0 = the dataset's default)",
                    "store_ratio": " (0 = the gcd of the ratios)",
                }.get(name, "")
                raise SweepConfigError(f"{name} must be >= {lo}{meaning}, got {v}")
        if not (self.first_stage == "bm25" or self.first_stage.startswith("run:")):
            raise SweepConfigError(f"first_stage must be 'bm25' or 'run:<path>', got {self.first_stage!r}")
        if self.quantization and self.quantization not in quantization.MODES:
            raise SweepConfigError(
                f"quantization must be one of {', '.join(quantization.MODES)}, got {self.quantization!r}"
            )
        if self.device_states not in DEVICE_STATES:
            raise SweepConfigError(
                f"device_states must be one of {', '.join(DEVICE_STATES)}, got {self.device_states!r}"
            )
        if self.storage not in STORAGE:
            raise SweepConfigError(f"storage must be one of {STORAGE}, got {self.storage!r}")
        t = self.store_lock_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise SweepConfigError(f"store_lock_timeout must be a number of seconds >= 0, got {t!r}")
        if self.on_stale not in ("error", "reencode"):
            raise SweepConfigError(f"on_stale must be 'error' or 'reencode', got {self.on_stale!r}")
        if self.on_unknown_docs not in ("error", "drop"):
            raise SweepConfigError(f"on_unknown_docs must be 'error' or 'drop', got {self.on_unknown_docs!r}")
        if self.top_k < 1:
            raise SweepConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.cascade_pair is not None:
            coarse, keep = self.cascade_pair
            if coarse < 1 or keep < 1:
                raise SweepConfigError(
                    f"cascade must be 'COARSE_RATIO:KEEP' with COARSE_RATIO >= 1 and KEEP >= 1 "
                    f"(score all candidates at ratio COARSE_RATIO, rescore the top KEEP), got "
                    f"{self.cascade!r}"
                )
        finest = self.finest_ratio
        bad = [r for r in self.ratios + ([self.cascade_pair[0]] if self.cascade_pair else []) if r % finest]
        if bad:
            raise SweepConfigError(f"ratios {bad} are not multiples of the store ratio {finest}")

    @property
    def finest_ratio(self) -> int:
        """The ratio passages are encoded at: `store_ratio`, else the gcd of all ratios (incl. the cascade's)."""
        if self.store_ratio:
            return int(self.store_ratio)
        return math.gcd(*self.ratios, *([self.cascade_pair[0]] if self.cascade_pair else []))

    @property
    def cascade_pair(self) -> tuple[int, int] | None:
        if not self.cascade:
            return None
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.cascade))
        if not m:
            raise SweepConfigError(f"cascade must be 'COARSE_RATIO:KEEP' (e.g. '16:20'), got {self.cascade!r}")
        return int(m.group(1)), int(m.group(2))

    def identity(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in IDENTITY_FIELDS}
        if self.quantization:  # results of the weights as loaded keep the identity they always had
            d["quantization"] = self.quantization
        if self.device_states != "compute":  # likewise: the default keeps the identity results always had
            d["device_states"] = self.device_states
        d["store_ratio"] = self.finest_ratio
        return d

    def instruction_value(self, label: str) -> str | bool | None:
        """The prompt instruction for a label (`prompts.resolve_instruction`): 'default' -> None (the default),
        'none' -> False (no ``<Instruct>`` line), else the text."""
        return prompts.resolve_instruction(label)


__all__ = ["Settings", "SweepConfigError", "IDENTITY_FIELDS", "DEFAULT_LABEL", "NONE_LABEL"]
