"""High-level reranking API: load a checkpoint, pre-encode passages once, score and rank queries against them.

    from kalm_jax.reranker import Reranker
    reranker = Reranker.from_pretrained("path/to/KaLM-Reranker-V1-Nano")
    reranker.rank("What is the capital of China?", ["The capital of China is Beijing.", "Gravity ..."])

Like sentence-transformers' `CrossEncoder` (`predict`, `rank`), plus what only this architecture allows:
`encode_passages` returns a `PassageStates` (pooled encoder states) that can be saved, re-pooled to a
coarser ratio and scored against any number of queries and instructions without running the encoder again.

Defaults follow the released KaLM code (research/paper.md §6): ratio 4, query limit 512 tokens, document
limit 1024 tokens (``<Document>: `` prefix included), batch 32, bf16, the default task instruction.

Throughput: documents are tokenized, sorted by length and batched longest first; every batch is padded to
shape buckets (batch: powers of two / multiples of 64, rounded to the device count; document length:
multiples of 128; decoder prompt: multiples of 32; windows: multiples of 16) so calls reuse compiled
programs; a device out-of-memory error retries the batch at 3/4 of its size; with several local devices each batch is sharded over a 1-D ``data`` mesh with
the weights replicated.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from kalm_jax import checkpointing, mep, prompts, scoring
from kalm_jax.config import parse_dtype
from kalm_jax.hf_tokenizer import AnyTokenizer, check_vocab, load_tokenizer
from kalm_jax.model import T5Gemma2
from kalm_jax.passage_states import STORAGE, PassageStates

DEFAULT_RATIO = 4
DEFAULT_BATCH_SIZE = 32
LENGTH_MULTIPLE = 128
WINDOW_MULTIPLE = 16
DECODER_MULTIPLE = 32
PROGRESS_MIN_ITEMS = 256
"""With ``show_progress=None`` a progress bar appears for lists at least this long."""


def _is_oom(err: Exception) -> bool:
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


def _check_texts(texts, what: str) -> list[str]:
    if isinstance(texts, (str, bytes)):
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
      tokenizer: a `kalm_jax.tokenizer.Tokenizer` or `kalm_jax.hf_tokenizer.HFTokenizer`.
      ratio: MEP pooling ratio r used by `encode_passages` and expected by `score`.
      max_query_tokens: queries are cut to this many tokens before entering the prompt.
      max_document_tokens: encoder inputs (``<Document>: `` prefix included) are cut to this many tokens.
      batch_size: pairs / documents per device step (before any out-of-memory back-off).
      instruction: default task instruction; None = `prompts.DEFAULT_INSTRUCTION`.
      system: system instruction; None = `prompts.DEFAULT_SYSTEM_INSTRUCTION`.
      devices: devices to run on; default all local devices (data parallel when more than one).
      show_progress: progress bars: True, False, or None (only for lists of >= 256 items).
    """

    def __init__(self, model: T5Gemma2, tokenizer: AnyTokenizer, *, ratio: int = DEFAULT_RATIO,
                 max_query_tokens: int | None = prompts.INFERENCE_QUERY_MAX_TOKENS,
                 max_document_tokens: int = prompts.INFERENCE_DOCUMENT_MAX_TOKENS,
                 batch_size: int = DEFAULT_BATCH_SIZE, instruction: str | None = None, system: str | None = None,
                 devices: Sequence[jax.Device] | None = None, show_progress: bool | None = None):
        check_vocab(tokenizer, model.config.vocab_size, where=str(getattr(tokenizer, "path", "tokenizer")))
        self.ratio = mep._check_ratio(ratio)
        if max_query_tokens is not None and max_query_tokens < 0:
            raise ValueError(f"max_query_tokens must be >= 0 or None, got {max_query_tokens}")
        if max_document_tokens < 1:
            raise ValueError(f"max_document_tokens must be >= 1, got {max_document_tokens}")
        self.max_query_tokens = max_query_tokens
        self.max_document_tokens = int(max_document_tokens)
        self.batch_size = self._check_batch_size(batch_size)
        self.instruction = instruction
        self.system = system
        self.show_progress = show_progress
        self.model = model
        self.tokenizer = tokenizer
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.array(self.devices), ("data",)) if len(self.devices) > 1 else None
        graphdef, state = nnx.split(model)
        state = jax.device_put(state, self._sharding(replicated=True))
        nnx.update(model, state)  # the model now shares the placed arrays (no second copy of the weights)
        self._graphdef, self._state = graphdef, state

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "bfloat16", ratio: int = DEFAULT_RATIO,
                        max_query_tokens: int | None = prompts.INFERENCE_QUERY_MAX_TOKENS,
                        max_document_tokens: int = prompts.INFERENCE_DOCUMENT_MAX_TOKENS, *,
                        tokenizer: str | Path | AnyTokenizer | None = None, **kwargs) -> "Reranker":
        """Loads a reranker from an HF directory, a kalm-jax model checkpoint or a training workdir.

        Args:
          path: HF directory (config.json + safetensors), Orbax model checkpoint, training step directory or
            training workdir (latest step), as accepted by `checkpointing.load_any`.
          dtype: parameter and compute dtype, "bfloat16" (default, as released) or "float32".
          tokenizer: a tokenizer object or a path (``tokenizer.model`` / ``tokenizer.json`` or a directory with
            one). Default: the one in `path` (for a training step directory, also its workdir).
          **kwargs: the other `Reranker` arguments (batch_size, instruction, devices, show_progress, ...).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: checkpoint path does not exist")
        if dtype is None or str(dtype) in ("float16", "fp16", "half"):
            raise ValueError(f"dtype={dtype!r}: use 'bfloat16' or 'float32' (fp16 gives non-finite logits)")
        parse_dtype(dtype)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            tokenizer = _find_tokenizer(path, tokenizer)
        _, model = checkpointing.load_any(path, dtype=dtype)
        return cls(model, tokenizer, ratio=ratio, max_query_tokens=max_query_tokens,
                   max_document_tokens=max_document_tokens, **kwargs)

    @staticmethod
    def _check_batch_size(batch_size) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return int(batch_size)

    # ------------------------------------------------------------------ identity of cached states
    @functools.cached_property
    def model_fingerprint(self) -> str:
        """Content hash of the weights and config (computed once, on first use)."""
        return checkpointing.fingerprint(self.model)

    @property
    def passage_meta(self) -> dict[str, Any]:
        """What `encode_passages` writes into `PassageStates.meta`; pass as `PassageStates.load(expect_meta=...)`."""
        return {"model": self.model_fingerprint, "tokenizer": self.tokenizer.fingerprint(),
                "max_length": self.max_document_tokens, "document_prefix": prompts.DOCUMENT_PREFIX,
                "compute_dtype": str(jnp.dtype(self.model.dtype))}

    def load_passages(self, directory: str | Path, *, mmap: bool = True) -> PassageStates:
        """`PassageStates.load` that refuses states written by another model, tokenizer or document limit."""
        return PassageStates.load(directory, expect_meta=self.passage_meta, mmap=mmap)

    # ------------------------------------------------------------------ devices
    def _sharding(self, replicated: bool):
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self.devices[0])
        return NamedSharding(self.mesh, PartitionSpec() if replicated else PartitionSpec("data"))

    def _rows(self, n: int) -> int:
        """Padded batch size: the batch bucket, rounded up to a multiple of the device count."""
        return scoring.bucket(scoring.batch_bucket(n), len(self.devices))

    def _put(self, *arrays: np.ndarray):
        sharding = self._sharding(replicated=False)
        return [jax.device_put(a, sharding) for a in arrays]

    # ------------------------------------------------------------------ batching
    def _progress(self, total: int, desc: str, show: bool | None):
        show = self.show_progress if show is None else show
        if show is None:
            show = total >= PROGRESS_MIN_ITEMS
        return tqdm(total=total, desc=desc, unit="doc" if "encod" in desc else "pair", disable=not show,
                    dynamic_ncols=True)

    def _run_batches(self, n: int, batch_size: int, run: Callable[[int, int], None], desc: str,
                     show: bool | None) -> None:
        """Calls ``run(start, stop)`` over [0, n) in batches; on device OOM retries at 3/4 of the batch size."""
        bs = self._check_batch_size(batch_size)
        start = 0
        with self._progress(n, desc, show) as bar:
            while start < n:
                stop = min(n, start + bs)
                try:
                    run(start, stop)
                except Exception as err:  # noqa: BLE001 - only device OOM is handled, the rest re-raised
                    if not _is_oom(err) or stop - start == 1:
                        raise
                    bs = max(1, (stop - start) * 3 // 4)
                    warnings.warn(f"{desc}: device out of memory with a batch of {stop - start}; "
                                  f"retrying with batch size {bs}", RuntimeWarning, stacklevel=3)
                    continue
                bar.update(stop - start)
                start = stop

    # ------------------------------------------------------------------ encoding
    def _tokenize_documents(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer.encode_batch([prompts.document_text(t) for t in texts])
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        over = lengths > self.max_document_tokens
        if over.any():
            cut = lengths[over] - self.max_document_tokens
            warnings.warn(
                f"{int(over.sum())} of {len(texts)} documents exceed max_document_tokens="
                f"{self.max_document_tokens} (the '{prompts.DOCUMENT_PREFIX}' prefix included) and were "
                f"truncated: {int(cut.max())} tokens cut from the longest ({int(lengths.max())} tokens), "
                f"{cut.mean():.1f} on average, {int(cut.sum())} in total", UserWarning, stacklevel=3)
        return [x[: self.max_document_tokens] for x in ids]

    def _encode_batch(self, seqs: Sequence[Sequence[int]], ratio: int):
        """Encoder + MEP for one batch: numpy (pooled [b,C,H], mask [b,C], counts [b,C]), C = ceil(longest/r)."""
        b = len(seqs)
        longest = max(len(s) for s in seqs)
        length = scoring.bucket(longest, int(np.lcm(LENGTH_MULTIPLE, ratio)))
        ids, mask = prompts.pad_batch(list(seqs) + [[self.tokenizer.pad_id]] * (self._rows(b) - b),
                                      self.tokenizer.pad_id, length=length)
        ids_d, mask_d = self._put(ids, mask)
        pooled, pmask, counts = scoring.encode_pool(self._graphdef, self._state, ids_d, mask_d, ratio)
        windows = -(-longest // ratio)
        return (np.asarray(pooled[:b, :windows]), np.asarray(pmask[:b, :windows]),
                np.asarray(counts[:b, :windows]))

    def encode_passages(self, texts: Sequence[str], ratio: int | None = None, batch_size: int | None = None, *,
                        ids: Sequence[str] | None = None, storage: str | None = None,
                        show_progress: bool | None = None) -> PassageStates:
        """Encodes documents once and pools them (MEP) for reuse by any query.

        Args:
          texts: raw documents (this method adds the ``<Document>: `` prefix); cut to `max_document_tokens`.
          ratio: MEP ratio (default: the reranker's). A finer ratio can be re-pooled later, exactly.
          batch_size: documents per step (default: the reranker's).
          ids: optional passage ids stored with the states (e.g. corpus ids).
          storage: "float32", "bfloat16" or "int8"; default the model's compute dtype.
        Returns:
          `PassageStates` in the input order: states [P, C, H], mask/counts [P, C], C = ceil(longest/ratio);
          ``meta`` = `passage_meta` (model/tokenizer fingerprints, max length).
        """
        texts = _check_texts(texts, "texts")
        ratio = self.ratio if ratio is None else mep._check_ratio(ratio)
        if ids is not None:
            ids = [str(i) for i in ids]
            if len(ids) != len(texts):
                raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        if storage is None:
            storage = "bfloat16" if self.model.dtype == jnp.bfloat16 else "float32"
        if storage not in STORAGE:
            raise ValueError(f"unknown storage {storage!r}; choose from {STORAGE}")
        hidden = self.model.config.hidden_size
        if not texts:
            empty = PassageStates(np.zeros((0, 0, hidden), np.float32), np.zeros((0, 0), np.int8),
                                  np.zeros((0, 0), np.int32), ratio, ids, meta=self.passage_meta)
            return empty.to_storage(storage)
        seqs = self._tokenize_documents(texts)
        lengths = np.array([len(s) for s in seqs])
        order = np.argsort(-lengths, kind="stable")
        width = -(-int(lengths.max()) // ratio)
        state_dtype = ml_dtypes.bfloat16 if self.model.dtype == jnp.bfloat16 else np.float32
        states = np.zeros((len(texts), width, hidden), state_dtype)
        mask = np.zeros((len(texts), width), np.int8)
        counts = np.zeros((len(texts), width), np.int32)

        def run(start: int, stop: int) -> None:
            rows = order[start:stop]
            pooled, pmask, cnt = self._encode_batch([seqs[i] for i in rows], ratio)
            w = pooled.shape[1]
            states[rows, :w] = pooled
            mask[rows, :w] = pmask
            counts[rows, :w] = cnt

        self._run_batches(len(texts), self.batch_size if batch_size is None else batch_size, run,
                          "encoding passages", show_progress)
        out = PassageStates(states, mask, counts, ratio, ids, meta=self.passage_meta)
        return out.to_storage(storage)

    # ------------------------------------------------------------------ scoring
    def _prompt(self, query: str, instruction) -> list[int]:
        instruction = self.instruction if instruction is None else instruction
        if self.max_query_tokens is not None:
            n = len(self.tokenizer.encode(query))
            if n > self.max_query_tokens:
                warnings.warn(f"query of {n} tokens truncated to max_query_tokens={self.max_query_tokens} "
                              f"({n - self.max_query_tokens} tokens cut)", UserWarning, stacklevel=4)
        return prompts.encode_decoder_prompt(self.tokenizer, query, instruction, self.system, self.max_query_tokens)

    def _as_states(self, passages, what: str = "passages") -> PassageStates:
        """Texts -> freshly encoded states; `PassageStates` -> checked and re-pooled to the reranker's ratio."""
        if not isinstance(passages, PassageStates):
            return self.encode_passages(_check_texts(passages, what))
        meta, mine = passages.meta, self.passage_meta
        for key, name in (("model", "model"), ("tokenizer", "tokenizer")):
            if key not in meta:
                warnings.warn(f"{what}: PassageStates.meta has no {name} fingerprint; cannot check that they were "
                              f"encoded by this reranker's {name}", UserWarning, stacklevel=4)
            elif meta[key] != mine[key]:
                raise ValueError(f"{what}: passage states were encoded by another {name} (fingerprint "
                                 f"{meta[key]!r}, this reranker's is {mine[key]!r}); encode them again with "
                                 f"this reranker's encode_passages")
        if "max_length" in meta and meta["max_length"] != mine["max_length"]:
            warnings.warn(f"{what}: passage states were encoded with max_length={meta['max_length']}, this "
                          f"reranker uses max_document_tokens={mine['max_length']}", UserWarning, stacklevel=4)
        if passages.ratio > self.ratio or self.ratio % passages.ratio:
            raise ValueError(f"{what}: states pooled at ratio {passages.ratio} cannot serve this reranker's ratio "
                             f"{self.ratio} (re-pooling only makes a ratio coarser, by an integer factor); encode "
                             f"at ratio {self.ratio} or a divisor of it, or build the Reranker with "
                             f"ratio={passages.ratio}")
        return passages

    def _margins(self, prompt_ids: Sequence[Sequence[int]], prompt_of: np.ndarray, passages: PassageStates,
                 passage_of: np.ndarray, batch_size: int | None, show_progress: bool | None) -> np.ndarray:
        """fp32 margins [N] for pairs (prompt_ids[prompt_of[i]], passages[passage_of[i]])."""
        n = len(prompt_of)
        out = np.zeros((n,), np.float32)
        if n == 0:
            return out
        factor = self.ratio // passages.ratio
        windows = -(-np.asarray(passages.mask).sum(axis=1) // factor)
        prompt_len = np.array([len(p) for p in prompt_ids])
        order = np.lexsort((-prompt_len[prompt_of], -windows[passage_of]))
        yes_no = jnp.asarray([self.tokenizer.yes_id, self.tokenizer.no_id], jnp.int32)
        compute = ml_dtypes.bfloat16 if self.model.dtype == jnp.bfloat16 else np.float32

        def run(start: int, stop: int) -> None:
            pairs = order[start:stop]
            b, rows = len(pairs), self._rows(len(pairs))
            chunk = passages.select(passage_of[pairs])
            if factor > 1:
                chunk = chunk.repool(factor)
            width = scoring.bucket(chunk.mask.shape[1], WINDOW_MULTIPLE)
            states = np.zeros((rows, width, chunk.states.shape[2]), compute)
            states[:b, : chunk.mask.shape[1]] = chunk.dense(np.float32)
            pmask = np.zeros((rows, width), np.int32)
            pmask[:b, : chunk.mask.shape[1]] = chunk.mask
            pmask[b:, 0] = 1  # padding rows attend to one (zero) window and are dropped
            dec, dmask = prompts.pad_batch([prompt_ids[i] for i in prompt_of[pairs]] +
                                           [[self.tokenizer.pad_id]] * (rows - b),
                                           self.tokenizer.pad_id, pad_to_multiple_of=DECODER_MULTIPLE)
            args = self._put(dec, dmask, states, pmask)
            margins = scoring.score_pairs(self._graphdef, self._state, *args, yes_no)
            out[pairs] = np.asarray(margins[:b], np.float32)

        self._run_batches(n, self.batch_size if batch_size is None else batch_size, run, "scoring", show_progress)
        return out

    def score(self, query: str, passages: Sequence[str] | PassageStates, instruction: str | bool | None = None,
              return_margin: bool = False, *, batch_size: int | None = None,
              show_progress: bool | None = None) -> np.ndarray:
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
        margins = self._margins([prompt], np.zeros(len(states), np.int64), states, np.arange(len(states)),
                                batch_size, show_progress)
        return margins if return_margin else scoring.probability(margins)

    def predict(self, pairs: Sequence[Sequence[str]], batch_size: int | None = None,
                instruction: str | bool | None = None, return_margin: bool = False, *,
                show_progress: bool | None = None) -> np.ndarray:
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
        return margins if return_margin else scoring.probability(margins)

    def rank(self, query: str, documents: Sequence[str] | PassageStates, top_k: int | None = None,
             return_documents: bool = False, instruction: str | bool | None = None, *,
             batch_size: int | None = None, show_progress: bool | None = None) -> list[dict[str, Any]]:
        """Documents sorted by relevance to `query`, like `CrossEncoder.rank`.

        Returns:
          up to `top_k` dicts, best first: ``corpus_id`` (index into `documents`), ``score`` (P(yes)),
          ``margin``, ``id`` (when `documents` are `PassageStates` with ids) and ``text`` (with
          `return_documents`; texts only). Ties in P(yes) are broken by the margin, then by corpus_id.
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                                  or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        is_states = isinstance(documents, PassageStates)
        if is_states and return_documents:
            raise ValueError("return_documents=True needs the document texts; PassageStates hold no text")
        if not is_states:
            documents = _check_texts(documents, "documents")
        margins = self.score(query, documents, instruction, return_margin=True, batch_size=batch_size,
                             show_progress=show_progress)
        probs = scoring.probability(margins)
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
        return (f"Reranker(hidden={c.hidden_size}, layers={c.num_encoder_layers}+{c.num_decoder_layers}, "
                f"dtype={jnp.dtype(self.model.dtype)}, "
                f"ratio={self.ratio}, max_query_tokens={self.max_query_tokens}, "
                f"max_document_tokens={self.max_document_tokens}, batch_size={self.batch_size}, "
                f"devices={len(self.devices)})")


def _find_tokenizer(path: Path, given: str | Path | None) -> AnyTokenizer:
    if given is not None:
        return load_tokenizer(given)
    candidates = [path, path / "tokenizer"]
    if path.parent.name == "checkpoints":  # a training step directory: the workdir is two levels up
        candidates += [path.parent.parent, path.parent.parent / "tokenizer"]
    for c in candidates:
        try:
            return load_tokenizer(c)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json found (looked in "
                            f"{', '.join(str(c) for c in candidates)}); pass tokenizer=PATH")


__all__ = ["Reranker", "DEFAULT_RATIO", "DEFAULT_BATCH_SIZE"]
