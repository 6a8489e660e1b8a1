"""`KaLMJaxReranker`: an MTEB (2.x) cross-encoder over kalm-jax's inference engine.

MTEB's `SearchCrossEncoderWrapper` hands a cross-encoder two row-aligned DataLoaders: each query repeated once per
first-stage candidate, and the candidates' document texts (``title + " " + text``). The released PyTorch wrapper
(mteb's `KaLMRerankerWrapper`) runs the whole encoder-decoder once per pair. This adapter keeps what makes kalm-jax
fast: within one `predict` call each distinct document is encoded once (MEP-pooled, optionally kept in a
passage-state store across runs), each distinct (query, instruction) prompt is tokenized once, and every pair is
scored by the decoder over the cached states in large length-sorted batches (`InferenceEngine.margins`).

What equals the released wrapper: the prompt strings (`kalm_jax.text.prompts`, byte for byte), the query cut (512
tokens) and the document cut (1024 tokens, ``<Document>: `` prefix included), MEP ratio 4, the returned score
P(yes) = softmax(yes, no)[yes] = sigmoid(logit(yes) - logit(no)) (float32), and a non-finite score is an error.
On instruction tasks the instruction comes from the queries' ``instruction`` column and the raw query from their
``query`` column (MTEB appends the instruction to ``text``; the PyTorch wrapper passes that appended text on as the
query as well, this adapter does not: the instruction goes in ``<Instruct>`` only).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kalm_jax.inference.engine import probability
from kalm_jax.inference.states import PassageStates
from kalm_jax.model import mep
from kalm_jax.text import prompts

log = logging.getLogger(__name__)

DEFAULT_SCORE_BATCH_SIZE = 256
"""(prompt, passage) pairs per decoder call (the eval sweep's `batch_pairs`)."""


class NonFiniteScoreError(FloatingPointError):
    """The model produced a non-finite yes/no margin for some pairs (fp16 weights, or broken weights)."""


def columns(loader, names: Sequence[str]) -> dict[str, list]:
    """The columns `names` (those present) of an MTEB DataLoader, in row order.

    MTEB's loaders wrap a `datasets.Dataset` (read column-wise, no collation); any other iterable of batches
    (dicts of lists) is read batch by batch."""
    ds = getattr(loader, "dataset", None)
    cols = getattr(ds, "column_names", None)
    if cols is not None:
        return {n: list(ds[n]) for n in names if n in cols}
    out: dict[str, list] = {}
    for batch in loader:
        for n in names:
            if n in batch:
                out.setdefault(n, []).extend(batch[n])
    return out


def text_id(text: str) -> str:
    """The passage-store id of a document text: its sha256 (a store is shared by every task and dataset)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class KaLMJaxReranker:
    """An MTEB cross-encoder (`mteb.models.models_protocols.CrossEncoderProtocol`) backed by kalm-jax.

    Args:
      checkpoint: any checkpoint `kalm_jax.checkpoints.loader.load` reads (HF directory, export, training workdir
          or step),
        or a ready `kalm_jax.Reranker` (its engine and settings are used as they are).
      ratio: MEP ratio the pairs are scored at (the released default, 4).
      encode_ratio: ratio the documents are encoded (and stored) at; a divisor of `ratio` (default `ratio`).
        Scores at `ratio` are then exact count-weighted re-poolings of these states.
      max_query_tokens, max_document_tokens, batch_size, instruction, system, dtype, tokenizer, devices,
        show_progress: the `Reranker` settings (`Reranker.from_pretrained`); `batch_size` is documents per
        encoder call.
      score_batch_size: (prompt, passage) pairs per decoder call.
      store_dir: a passage-state store directory (`kalm_jax.evaluation.store.PassageStore`, keyed by the model,
        tokenizer, document limit, `encode_ratio` and `storage`): documents already there are not encoded again,
        so repeated MTEB runs reuse the encodings. Documents are stored under the sha256 of their text.
      storage: stored state dtype with a store: float32 | bfloat16 | int8 (default: the model's compute dtype).
      name, revision: what `mteb_model_meta` reports (MTEB names result folders after them); default name
        ``kalm-jax/<checkpoint directory name>``.
      device: accepted for MTEB's loader protocol; kalm-jax runs on JAX's devices (`devices`).
    """

    def __init__(
        self,
        checkpoint,
        *,
        ratio: int = 4,
        encode_ratio: int | None = None,
        max_query_tokens: int | None = prompts.INFERENCE_QUERY_MAX_TOKENS,
        max_document_tokens: int = prompts.INFERENCE_DOCUMENT_MAX_TOKENS,
        batch_size: int = 32,
        score_batch_size: int = DEFAULT_SCORE_BATCH_SIZE,
        instruction: str | bool | None = None,
        system: str | None = None,
        dtype: str | None = None,
        tokenizer=None,
        devices=None,
        store_dir: str | Path | None = None,
        storage: str | None = None,
        name: str | None = None,
        revision: str | None = None,
        device: Any = None,
        show_progress: bool | None = False,
    ):
        from kalm_jax.inference.reranker import Reranker

        if device is not None:
            log.info("KaLMJaxReranker: device=%r ignored; kalm-jax runs on JAX's devices", device)
        if isinstance(checkpoint, Reranker):
            self.reranker = checkpoint
            self.checkpoint = None
        else:
            self.checkpoint = str(checkpoint)
            self.reranker = Reranker.from_pretrained(
                checkpoint,
                dtype=dtype,
                ratio=ratio,
                max_query_tokens=max_query_tokens,
                max_document_tokens=max_document_tokens,
                tokenizer=tokenizer,
                batch_size=batch_size,
                instruction=instruction,
                system=system,
                devices=devices,
                show_progress=show_progress,
            )
        self.ratio = self.reranker.ratio
        self.encode_ratio = self.ratio if encode_ratio is None else mep.check_ratio(encode_ratio)
        if self.ratio % self.encode_ratio:
            raise ValueError(
                f"encode_ratio={self.encode_ratio} must divide ratio={self.ratio} (coarser ratios are "
                "exact re-poolings of finer ones, not the other way round)"
            )
        if isinstance(score_batch_size, bool) or not isinstance(score_batch_size, int) or score_batch_size < 1:
            raise ValueError(f"score_batch_size must be a positive integer, got {score_batch_size!r}")
        self.score_batch_size = score_batch_size
        self.show_progress = show_progress
        self.store_dir = Path(store_dir) if store_dir else None
        self.storage = storage
        self._store = None
        self._name = name
        self._revision = revision
        self.stats = {
            "predict_calls": 0,
            "pairs": 0,
            "distinct_documents": 0,
            "encoded_documents": 0,
            "distinct_prompts": 0,
        }

    # ------------------------------------------------------------------ MTEB protocol
    @property
    def engine(self):
        return self.reranker.engine

    @functools.cached_property
    def mteb_model_meta(self):
        """`mteb.models.ModelMeta` of this checkpoint: a cross-encoder in the JAX framework."""
        from mteb.models.model_meta import ModelMeta

        config = self.reranker.model.config
        tail = Path(self.checkpoint).name if self.checkpoint else "reranker"
        name = self._name or f"kalm-jax/{tail}"
        n_params = _count_parameters(self.reranker.model)
        return ModelMeta(
            loader=None,
            name=name,
            revision=self._revision or self.engine.model_fingerprint[:12],
            release_date=None,
            languages=None,
            n_parameters=n_params,
            memory_usage_mb=None,
            max_tokens=float(self.engine.max_document_tokens),
            embed_dim=int(config.hidden_size),
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["JAX"],
            similarity_fn_name=None,
            use_instructions=True,
            training_datasets=None,
            adapted_from="KaLM-Embedding/KaLM-Reranker-V1",
            model_type=["cross-encoder"],
            modalities=["text"],
            experiment_kwargs={"ratio": self.ratio},
        )

    def predict(
        self,
        inputs1,
        inputs2,
        *,
        task_metadata=None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type=None,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        **kwargs,
    ) -> np.ndarray:
        """P(yes) (float32 [N]) of the N row-aligned (query, document) pairs of `inputs1` and `inputs2`.

        Queries: the ``query`` column when present (raw query; MTEB's ``text`` has the instruction appended),
        else ``text``; the instruction: the ``instruction`` column when present, else the adapter's. Documents:
        ``text``. MTEB's `batch_size` sizes its DataLoaders only; scoring uses `score_batch_size`.
        """
        q_cols = columns(inputs1, ("text", "query", "instruction"))
        queries = q_cols.get("query", q_cols.get("text"))
        documents = columns(inputs2, ("text",)).get("text")
        if queries is None or documents is None:
            raise ValueError("KaLMJaxReranker.predict needs a 'text' column in both inputs (text tasks only)")
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries for {len(documents)} documents: MTEB passes row-aligned pairs")
        instructions = q_cols.get("instruction")
        return self.score_pairs(
            queries,
            documents,
            instructions,
            show_progress=self.show_progress if show_progress_bar is None else show_progress_bar,
        )

    # ------------------------------------------------------------------ scoring
    def score_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instructions: Sequence[str | None] | None = None,
        *,
        return_margin: bool = False,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """P(yes) (or margins) of row-aligned (query, document[, instruction]) pairs; the body of `predict`.

        Each distinct document is encoded once (at `encode_ratio`, or read from the store), each distinct
        (query, instruction) prompt tokenized once; pairs are scored at `ratio` over the cached states."""
        n = len(queries)
        if len(documents) != n:
            raise ValueError(f"{n} queries for {len(documents)} documents: pairs are row-aligned")
        if instructions is not None and len(instructions) != n:
            raise ValueError(f"{len(instructions)} instructions for {n} queries")
        for i, (q, d) in enumerate(zip(queries, documents)):
            if not isinstance(q, str) or not isinstance(d, str):
                raise TypeError(f"pair {i}: query and document must be str, got {type(q).__name__}, {type(d).__name__}")
        prompts_of: dict[tuple[str, Any], int] = {}
        docs_of: dict[str, int] = {}
        q_of = np.zeros(n, np.int64)
        d_of = np.zeros(n, np.int64)
        for i in range(n):
            ins = None if instructions is None else instructions[i]
            q_of[i] = prompts_of.setdefault((queries[i], ins), len(prompts_of))
            d_of[i] = docs_of.setdefault(documents[i], len(docs_of))
        self.stats["predict_calls"] += 1
        self.stats["pairs"] += n
        self.stats["distinct_documents"] += len(docs_of)
        self.stats["distinct_prompts"] += len(prompts_of)
        if n == 0:
            return np.zeros((0,), np.float32)
        states = self._states(list(docs_of), show_progress)
        default = self.reranker.instruction
        rows = [
            self.engine.prompt_ids(q, default if ins is None else ins, self.reranker.system, warn=False)
            for q, ins in prompts_of
        ]  # queries cut to max_query_tokens silently, as the released wrapper does
        margins = self.engine.margins(
            rows,
            q_of,
            states,
            d_of,
            ratio=self.ratio,
            batch_size=self.score_batch_size,
            show_progress=show_progress,
            desc="mteb: scoring pairs",
        )
        bad = np.flatnonzero(~np.isfinite(margins))
        if bad.size:
            i = int(bad[0])
            raise NonFiniteScoreError(
                f"the model produced non-finite yes/no logits for {bad.size} of {n} pairs (first: query "
                f"{queries[i]!r:.80}, document {documents[i]!r:.80}); use float32 or bfloat16 weights, not float16"
            )
        return margins if return_margin else probability(margins)

    def _states(self, texts: list[str], show_progress: bool | None) -> PassageStates:
        """States of `texts` (in that order) at `encode_ratio`: encoded now, or from / into the store."""
        if self.store_dir is None:
            self.stats["encoded_documents"] += len(texts)
            return self.engine.encode(texts, self.encode_ratio, storage=self.storage, show_progress=show_progress)
        store = self._open_store()
        ids = [text_id(t) for t in texts]
        self.stats["encoded_documents"] += store.ensure(
            self.engine, dict(zip(ids, texts)), ids, progress=bool(show_progress)
        )
        return store.lookup(ids, self.encode_ratio)

    def _open_store(self):
        if self._store is None:
            from kalm_jax.evaluation import store as store_lib

            storage = self.storage or ("bfloat16" if self.engine.state_dtype != np.float32 else "float32")
            key = store_lib.StoreKey.for_engine(self.engine, self.encode_ratio, storage)
            self._store = store_lib.PassageStore.open(self.store_dir, key)
        return self._store

    def __repr__(self) -> str:
        return (
            f"KaLMJaxReranker(checkpoint={self.checkpoint!r}, ratio={self.ratio}, encode_ratio={self.encode_ratio}, "
            f"score_batch_size={self.score_batch_size}, store_dir={self.store_dir})"
        )


def _count_parameters(model) -> int:
    import jax
    from flax import nnx

    _, state = nnx.split(model)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state) if hasattr(x, "shape")))


__all__ = ["KaLMJaxReranker", "NonFiniteScoreError", "text_id", "DEFAULT_SCORE_BATCH_SIZE"]
