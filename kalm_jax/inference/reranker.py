"""High-level reranking API: load a checkpoint, pre-encode passages once, score and rank queries against them.

    from kalm_jax.inference.reranker import Reranker
    reranker = Reranker.from_pretrained("path/to/KaLM-Reranker-V1-Nano")
    reranker.rank("What is the capital of China?", ["The capital of China is Beijing.", "Gravity ..."])

Like sentence-transformers' `CrossEncoder` (`predict`, `rank`), plus what only this architecture allows:
`encode_passages` returns a `PassageStates` (pooled encoder states) that can be saved, re-pooled to a
coarser ratio and scored against any number of queries and instructions without running the encoder again.

Defaults follow the released KaLM code (`kalm_reranker.py` on the Hub): ratio 4, query limit 512 tokens, document
limit 1024 tokens (``<Document>: `` prefix included), batch 32, the default task instruction, and float32
on CPU / bfloat16 on accelerators.

A thin client of `kalm_jax.inference.engine.InferenceEngine`, which owns weight placement, bucketing, length sorting,
out-of-memory back-off and transfers; checkpoints are loaded by `kalm_jax.checkpoints.loader.load`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kalm_jax.checkpoints import loader
from kalm_jax.inference.engine import DEFAULT_BATCH_SIZE, InferenceEngine, probability
from kalm_jax.inference.states import PassageStates
from kalm_jax.model import mep
from kalm_jax.model.config import parse_dtype
from kalm_jax.model.t5gemma2 import T5Gemma2
from kalm_jax.text import prompts
from kalm_jax.text.hf_json import AnyTokenizer

DEFAULT_RATIO = 4


def _check_texts(texts, what: str) -> list[str]:
    if isinstance(texts, (str, bytes, Mapping)):
        if isinstance(texts, Mapping):
            raise TypeError(f"{what} must be a list of strings, got a {type(texts).__name__}; pass its values")
        raise TypeError(f"{what} must be a list of strings, got a single {type(texts).__name__}; wrap it in a list")
    if not isinstance(texts, Sequence) and not hasattr(texts, "__iter__"):
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a str: {t!r:.80}")
    return texts


def _check_query(query, what: str = "query") -> str:
    if not isinstance(query, str):
        raise TypeError(f"{what} must be a str, got {type(query).__name__}: {query!r:.80}")
    return query


class Reranker:
    """KaLM-Reranker-V1 (FBNL) reranker over a loaded `T5Gemma2` and its tokenizer.

    Args:
      model: the encoder-decoder (any dtype; bf16 for serving, fp32 for exact comparisons).
      tokenizer: a `kalm_jax.text.spm.Tokenizer` or `kalm_jax.text.hf_json.HFTokenizer`.
      ratio: MEP pooling ratio r used by `encode_passages` and expected by `score`.
      max_query_tokens: queries are cut to this many tokens before entering the prompt.
      max_document_tokens: encoder inputs (``<Document>: `` prefix included) are cut to this many tokens.
      batch_size: pairs / documents per device step (before any out-of-memory back-off).
      instruction: default task instruction; None = `prompts.DEFAULT_INSTRUCTION`.
      system: system instruction; None = `prompts.DEFAULT_SYSTEM_INSTRUCTION`.
      devices: devices to run on; default all local devices (data parallel when more than one).
      show_progress: progress bars: True, False, or None (only for lists of >= 256 items).
      quantization: quantized weights (`kalm_jax.model.quantization.MODES`: "none", "int8", "int8-dynamic",
        "fp8"), applied by the engine to a copy of `model`; None runs the model as it is.
      device_states: how passage states reach the score program (`engine.DEVICE_STATES`): "compute" (default)
        or "int8" (int8 values + an fp32 scale per window, dequantized inside the score program).
    """

    def __init__(
        self,
        model: T5Gemma2,
        tokenizer: AnyTokenizer,
        *,
        ratio: int = DEFAULT_RATIO,
        max_query_tokens: int | None = prompts.INFERENCE_QUERY_MAX_TOKENS,
        max_document_tokens: int = prompts.INFERENCE_DOCUMENT_MAX_TOKENS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        instruction: str | None = None,
        system: str | None = None,
        devices: Sequence[jax.Device] | None = None,
        show_progress: bool | None = None,
        quantization: str | None = None,
        device_states: str = "compute",
    ):
        self.ratio = mep.check_ratio(ratio)
        if instruction is not None and not isinstance(instruction, (str, bool)):
            raise TypeError(f"instruction must be a str, None or False, got {type(instruction).__name__}")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a str or None, got {type(system).__name__}")
        self.instruction = instruction
        self.system = system
        self.engine = InferenceEngine(
            model,
            tokenizer,
            devices=devices,
            batch_size=batch_size,
            max_document_tokens=max_document_tokens,
            max_query_tokens=max_query_tokens,
            show_progress=show_progress,
            quantization=quantization,
            device_states=device_states,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | None = None,
        ratio: int = DEFAULT_RATIO,
        max_query_tokens: int | None = prompts.INFERENCE_QUERY_MAX_TOKENS,
        max_document_tokens: int = prompts.INFERENCE_DOCUMENT_MAX_TOKENS,
        *,
        tokenizer: str | Path | AnyTokenizer | None = None,
        **kwargs,
    ) -> Reranker:
        """Loads a reranker from any checkpoint `kalm_jax.checkpoints.loader.load` accepts.

        Args:
          path: HF directory (config.json + safetensors + tokenizer.model or tokenizer.json), kalm-jax model
            checkpoint, training step directory or training workdir (latest step).
          dtype: parameter and compute dtype, "float32" or "bfloat16"; default (None) float32 on CPU and
            bfloat16 on accelerators, as the released code does.
          tokenizer: a tokenizer object or a path (``tokenizer.model`` / ``tokenizer.json`` or a directory with
            one). Default: the checkpoint's own.
          **kwargs: the other `Reranker` arguments (batch_size, instruction, devices, show_progress, ...).
        """
        if dtype is None:
            dtype = default_dtype()
        if str(dtype) in ("float16", "fp16", "half"):
            raise ValueError(f"dtype={dtype!r}: use 'bfloat16' or 'float32' (fp16 gives non-finite logits)")
        parse_dtype(dtype)
        _, model, tok = loader.load(path, dtype=dtype, tokenizer=tokenizer)
        return cls(
            model,
            tok,
            ratio=ratio,
            max_query_tokens=max_query_tokens,
            max_document_tokens=max_document_tokens,
            **kwargs,
        )

    # ------------------------------------------------------------------ engine-backed attributes
    @property
    def model(self) -> T5Gemma2:
        return self.engine.model

    @property
    def tokenizer(self) -> AnyTokenizer:
        return self.engine.tokenizer

    @property
    def devices(self) -> list:
        return self.engine.devices

    @property
    def mesh(self):
        """The engine's ``("data",)`` mesh over `devices`."""
        return self.engine.mesh

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    @property
    def max_query_tokens(self) -> int | None:
        return self.engine.max_query_tokens

    @property
    def max_document_tokens(self) -> int:
        return self.engine.max_document_tokens

    @property
    def model_fingerprint(self) -> str:
        """Content hash of the weights and config (computed once, on first use)."""
        return self.engine.model_fingerprint

    @property
    def passage_meta(self) -> dict[str, Any]:
        """What `encode_passages` writes into `PassageStates.meta`; pass as `PassageStates.load(expect_meta=...)`."""
        return self.engine.passage_meta

    def load_passages(self, directory: str | Path, *, mmap: bool = True) -> PassageStates:
        """`PassageStates.load` that refuses states written by another model, tokenizer or document limit."""
        return PassageStates.load(
            directory, expect_meta=self.passage_meta, mmap=mmap, hidden_size=self.model.config.hidden_size
        )

    # ------------------------------------------------------------------ encoding
    def encode_passages(
        self,
        texts: Sequence[str],
        ratio: int | None = None,
        batch_size: int | None = None,
        *,
        ids: Sequence[str] | None = None,
        storage: str | None = None,
        show_progress: bool | None = None,
    ) -> PassageStates:
        """Encodes documents once and pools them (MEP) for reuse by any query.

        Args:
          texts: raw documents (this method adds the ``<Document>: `` prefix); cut to `max_document_tokens`.
          ratio: MEP ratio (default: the reranker's). A finer ratio can be re-pooled later, exactly.
          batch_size: documents per step (default: the reranker's).
          ids: optional passage ids (strings or integers) stored with the states (e.g. corpus ids).
          storage: "float32", "bfloat16" or "int8"; default the model's compute dtype.
        Returns:
          `PassageStates` in the input order: states [P, C, H], mask/counts [P, C], C = ceil(longest/ratio);
          ``meta`` = `passage_meta` (model/tokenizer fingerprints, max length).
        """
        texts = _check_texts(texts, "texts")
        ratio = self.ratio if ratio is None else mep.check_ratio(ratio)
        if ids is not None:
            ids = _check_ids(ids, len(texts))
        return self.engine.encode(
            texts, ratio, ids=ids, storage=storage, batch_size=batch_size, show_progress=show_progress
        )

    # ------------------------------------------------------------------ scoring
    def _prompt(self, query: str, instruction) -> list[int]:
        instruction = self.instruction if instruction is None else instruction
        return self.engine.prompt_ids(query, instruction, self.system)

    def _as_states(self, passages, what: str = "passages") -> PassageStates:
        """Texts -> freshly encoded states; `PassageStates` -> checked and re-pooled to the reranker's ratio."""
        if not isinstance(passages, PassageStates):
            return self.encode_passages(_check_texts(passages, what))
        meta, mine = passages.meta, self.passage_meta
        for key, name in (("model", "model"), ("tokenizer", "tokenizer")):
            if key not in meta:
                warnings.warn(
                    f"{what}: PassageStates.meta has no {name} fingerprint; cannot check that they were "
                    f"encoded by this reranker's {name}",
                    UserWarning,
                    stacklevel=4,
                )
            elif meta[key] != mine[key]:
                raise ValueError(
                    f"{what}: passage states were encoded by another {name} (fingerprint "
                    f"{meta[key]!r}, this reranker's is {mine[key]!r}); encode them again with "
                    f"this reranker's encode_passages"
                )
        if "max_length" in meta and meta["max_length"] != mine["max_length"]:
            warnings.warn(
                f"{what}: passage states were encoded with max_length={meta['max_length']}, this "
                f"reranker uses max_document_tokens={mine['max_length']}",
                UserWarning,
                stacklevel=4,
            )
        if passages.ratio > self.ratio or self.ratio % passages.ratio:
            raise ValueError(
                f"{what}: states pooled at ratio {passages.ratio} cannot serve this reranker's ratio "
                f"{self.ratio} (re-pooling only makes a ratio coarser, by an integer factor); encode "
                f"at ratio {self.ratio} or a divisor of it, or build the Reranker with "
                f"ratio={passages.ratio}"
            )
        return passages

    def _margins(
        self,
        prompt_ids: Sequence[Sequence[int]],
        prompt_of: np.ndarray,
        passages: PassageStates,
        passage_of: np.ndarray,
        batch_size: int | None,
        show_progress: bool | None,
    ) -> np.ndarray:
        """fp32 margins [N] for pairs (prompt_ids[prompt_of[i]], passages[passage_of[i]]) at the reranker's ratio."""
        return self.engine.margins(
            prompt_ids,
            prompt_of,
            passages,
            passage_of,
            ratio=self.ratio,
            batch_size=batch_size,
            show_progress=show_progress,
        )

    def score(
        self,
        query: str,
        passages: Sequence[str] | PassageStates,
        instruction: str | bool | None = None,
        return_margin: bool = False,
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Relevance of each passage to `query`.

        Args:
          query: the query text (cut to `max_query_tokens`).
          passages: document texts, or `PassageStates` from `encode_passages` (re-pooled to this reranker's
            ratio when stored finer).
          instruction: task instruction (default: the reranker's, else `prompts.DEFAULT_INSTRUCTION`;
            `prompts.NO_INSTRUCTION` drops the line).
          return_margin: return logit(yes) - logit(no) instead of P(yes).
        Returns:
          float32 [P]: P(yes) = sigmoid(margin) in [0, 1], or margins, in passage order.
        """
        query = _check_query(query)
        states = self._as_states(passages)
        prompt = self._prompt(query, instruction)
        margins = self._margins(
            [prompt], np.zeros(len(states), np.int64), states, np.arange(len(states)), batch_size, show_progress
        )
        return margins if return_margin else probability(margins)

    def predict(
        self,
        pairs: Sequence[Sequence[str]],
        batch_size: int | None = None,
        instruction: str | bool | None = None,
        return_margin: bool = False,
        *,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Scores (query, document) pairs like `CrossEncoder.predict`; each distinct document is encoded once.

        Returns:
          float32 [N]: P(yes) (or margins with `return_margin`) in the order of `pairs`.
        """
        if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
            raise TypeError(f"pairs must be a list of (query, document) pairs, got {type(pairs).__name__}")
        pairs = list(pairs)
        if len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
            raise TypeError("pairs must be a list of (query, document) pairs; got one pair: wrap it in a list")
        queries: dict[str, int] = {}
        docs: dict[str, int] = {}
        q_of = np.zeros(len(pairs), np.int64)
        d_of = np.zeros(len(pairs), np.int64)
        for i, pair in enumerate(pairs):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise TypeError(f"pairs[{i}] must be a (query, document) pair, got {pair!r:.80}")
            q = _check_query(pair[0], f"pairs[{i}][0] (query)")
            d = _check_query(pair[1], f"pairs[{i}][1] (document)")
            q_of[i] = queries.setdefault(q, len(queries))
            d_of[i] = docs.setdefault(d, len(docs))
        states = self.encode_passages(list(docs), batch_size=batch_size, show_progress=show_progress)
        prompt_ids = [self._prompt(q, instruction) for q in queries]
        margins = self._margins(prompt_ids, q_of, states, d_of, batch_size, show_progress)
        return margins if return_margin else probability(margins)

    def rank(
        self,
        query: str,
        documents: Sequence[str] | PassageStates,
        top_k: int | None = None,
        return_documents: bool = False,
        instruction: str | bool | None = None,
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Documents sorted by relevance to `query`, like `CrossEncoder.rank`.

        Returns:
          up to `top_k` dicts, best first: ``corpus_id`` (index into `documents`), ``score`` (P(yes)),
          ``margin``, ``id`` (when `documents` are `PassageStates` with ids) and ``text`` (with
          `return_documents`; texts only). Ties in P(yes) are broken by the margin, then by corpus_id.
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        is_states = isinstance(documents, PassageStates)
        if is_states and return_documents:
            raise ValueError("return_documents=True needs the document texts; PassageStates hold no text")
        if not is_states:
            documents = _check_texts(documents, "documents")
        margins = self.score(
            query, documents, instruction, return_margin=True, batch_size=batch_size, show_progress=show_progress
        )
        probs = probability(margins)
        order = np.lexsort((np.arange(len(margins)), -margins))[:top_k]
        ranked = []
        for i in order:
            row = {"corpus_id": int(i), "score": float(probs[i]), "margin": float(margins[i])}
            if is_states and documents.ids is not None:
                row["id"] = documents.ids[i]
            if return_documents:
                row["text"] = documents[i]
            ranked.append(row)
        return ranked

    def __repr__(self) -> str:
        c = self.model.config
        return (
            f"Reranker(hidden={c.hidden_size}, layers={c.num_encoder_layers}+{c.num_decoder_layers}, "
            f"dtype={jnp.dtype(self.model.dtype)}, "
            f"ratio={self.ratio}, max_query_tokens={self.max_query_tokens}, "
            f"max_document_tokens={self.max_document_tokens}, batch_size={self.batch_size}, "
            f"devices={len(self.devices)})"
        )


def default_dtype() -> str:
    """float32 on CPU, bfloat16 on accelerators (the released code's choice)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _check_ids(ids, n: int) -> list[str]:
    if isinstance(ids, (str, bytes, Mapping)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"ids must be a list of strings or integers, got {type(ids).__name__}")
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} texts")
    bad = [i for i, x in enumerate(ids) if isinstance(x, bool) or not isinstance(x, (str, int, np.integer))]
    if bad:
        raise TypeError(f"ids[{bad[0]}] is {ids[bad[0]]!r}: ids must be strings or integers")
    out = [str(x) for x in ids]
    if len(set(out)) != len(out):
        dup = next(x for x in out if out.count(x) > 1)
        raise ValueError(f"ids must be unique; {dup!r} appears more than once")
    return out


__all__ = ["Reranker", "DEFAULT_RATIO", "DEFAULT_BATCH_SIZE", "default_dtype"]
