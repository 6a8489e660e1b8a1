"""Checks a released KaLM-Reranker-V1 checkpoint against the scores its authors published.

    kalm-verify-release /path/to/KaLM-Reranker-V1-Nano [--config.variant=nano] [--config.dtype=bfloat16]

Scores the model card's example (query "What is the capital of China?", documents "The capital of China is
Beijing." and "Gravity attracts bodies toward one another.", MEP ratio 4, bf16) with `Reranker` and compares
the margins logit(yes) - logit(no) with the published ones (model card, vllm_support/README.md). Where only P(yes) was
published, the reference margin is logit(P). bf16 rounds margins to a few bits, so the check is relative
(default 1e-2). Prints a pass/fail table; the exit status is 0 when every row passes, 1 when one fails and
2 when the checkpoint cannot be checked (no published reference for its size, unreadable path).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence

from kalm_jax.model.config import ModelConfig

QUERY = "What is the capital of China?"
DOCUMENTS = ("The capital of China is Beijing.", "Gravity attracts bodies toward one another.")
WEB_INSTRUCTION = "Given a web search query, retrieve passages that answer the query."


@dataclasses.dataclass(frozen=True)
class Reference:
    """Published outputs for `QUERY` against `DOCUMENTS` (one value per document)."""

    case: str
    instruction: str | None  # None = the default instruction
    scores: tuple[float, ...]
    margins: tuple[float, ...] | None  # None where only P(yes) was published
    source: str


REFERENCES: dict[str, tuple[Reference, ...]] = {
    "nano": (
        Reference(
            "default instruction",
            None,
            (0.99984646, 6.8936106e-07),
            (8.78125, -14.1875),
            "Nano model card, CrossEncoder, bf16, chunk_size=4",
        ),
        Reference(
            "web-search instruction",
            WEB_INSTRUCTION,
            (0.997285, 5.896418e-07),
            None,
            "Nano model card, CrossEncoder prompt=..., bf16, chunk_size=4",
        ),
    ),
    "large": (
        Reference(
            "default instruction",
            None,
            (0.99980897, 4.93699e-06),
            (8.5625, -12.21875),
            "Large vllm_support/README.md, bf16, encoder_chunk_size=4",
        ),
    ),
}
"""Published reference outputs per released size (each entry names its source). Small has none."""

HIDDEN_TO_VARIANT = {640: "nano", 1152: "small", 2560: "large"}
"""Released sizes by hidden width (the KaLM-Reranker-V1 model cards: 640, 1152, 2560)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One (case, document) comparison; passes when |margin - ref_margin| <= tolerance."""

    case: str
    document: str
    ref_score: float
    score: float
    ref_margin: float
    ref_margin_derived: bool
    margin: float
    tolerance: float

    @property
    def error(self) -> float:
        return abs(self.margin - self.ref_margin)

    @property
    def passed(self) -> bool:
        return math.isfinite(self.margin) and self.error <= self.tolerance


def variant_for(config: ModelConfig) -> str:
    """The released size whose hidden width matches `config` ("nano", "small" or "large")."""
    try:
        return HIDDEN_TO_VARIANT[config.hidden_size]
    except KeyError:
        known = ", ".join(f"{h} ({v})" for h, v in HIDDEN_TO_VARIANT.items())
        raise ValueError(
            f"hidden size {config.hidden_size} is not a released KaLM-Reranker-V1 size ({known}); pass --config.variant"
        ) from None


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def verify(reranker, variant: str, rtol: float = 1e-2) -> list[Row]:
    """Scores the model-card example for each reference case of `variant`; one `Row` per document."""
    if variant not in REFERENCES:
        raise KeyError(
            f"no published reference outputs for variant {variant!r} "
            f"(references exist for: {', '.join(sorted(REFERENCES))})"
        )
    rows = []
    for ref in REFERENCES[variant]:
        margins = reranker.score(QUERY, list(DOCUMENTS), instruction=ref.instruction, return_margin=True)
        for i, doc in enumerate(DOCUMENTS):
            ref_margin = ref.margins[i] if ref.margins is not None else _logit(ref.scores[i])
            m = float(margins[i])
            rows.append(
                Row(
                    ref.case,
                    doc,
                    ref.scores[i],
                    1.0 / (1.0 + math.exp(-m)) if m > -700 else 0.0,
                    ref_margin,
                    ref.margins is None,
                    m,
                    rtol * abs(ref_margin),
                )
            )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width pass/fail table (margins marked * were derived as logit(published P(yes)))."""
    head = ("case", "document", "P(yes) ref", "P(yes) ours", "margin ref", "margin ours", "|diff|", "tol", "")
    body = [
        (
            r.case,
            r.document[:44],
            f"{r.ref_score:.8g}",
            f"{r.score:.8g}",
            f"{r.ref_margin:.5f}{'*' if r.ref_margin_derived else ''}",
            f"{r.margin:.5f}",
            f"{r.error:.4f}",
            f"{r.tolerance:.4f}",
            "PASS" if r.passed else "FAIL",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(r.ref_margin_derived for r in rows):
        lines.append("* reference margin = logit(published P(yes)); only the probability was published")
    return "\n".join(lines)


def run(config) -> int:
    """Scores the model-card example with the checkpoint at `config.path`; 0 pass, 1 fail, 2 nothing to compare."""
    from kalm_jax.inference.reranker import Reranker  # heavy imports only after argument parsing

    try:
        if not config.path:
            raise ValueError("PATH is required: kalm-verify-release PATH")
        reranker = Reranker.from_pretrained(
            config.path, dtype=config.dtype, ratio=config.ratio, tokenizer=config.tokenizer or None
        )
        variant = variant_for(reranker.model.config) if config.variant == "auto" else config.variant
        if variant not in REFERENCES:
            raise KeyError(
                f"no published reference outputs for variant {variant!r} (references exist for: "
                f"{', '.join(sorted(REFERENCES))}); nothing to compare with"
            )
    except (OSError, ValueError, KeyError) as err:
        print(f"verify_release: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    rows = verify(reranker, variant, config.rtol)
    print(f"{config.path}: variant {variant}, dtype {config.dtype}, ratio {config.ratio}, query {QUERY!r}")
    for ref in REFERENCES[variant]:
        print(f"  {ref.case}: {ref.source}")
    print(format_table(rows))
    failed = sum(not r.passed for r in rows)
    print(f"{'PASS' if not failed else 'FAIL'}: {len(rows) - failed}/{len(rows)} rows within rtol={config.rtol:g}")
    return 1 if failed else 0
