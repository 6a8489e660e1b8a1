"""Grain training input pipeline over a prepared TFDS dataset: fixed-shape numpy batches of query groups.

Per host, each batch holds B queries (``batch_size`` is per host; the global batch is B * process_count),
each with a group of G passages: one positive at g=0 and G-1 negatives. The global order of the records is
one permutation per epoch from (seed, epoch) (Grain's `IndexSampler` over all records); global batch t is
the next B * process_count records of that stream and host p contributes its rows [p*B, (p+1)*B)
(`ShardedBatchSampler`).
So step t's global batch is the same records in the same order for any mesh (``batch_shards``), process
count and worker count. The iterator state (`TrainingIterator.get_state` / `set_state`) is the position in
that stream: it resumes on exactly the next global batch, on any mesh and process count.

Group sampling, from an rng Grain derives from (seed, position in the sampled stream), so it is
deterministic and differs between epochs:
  * the positive is one of the example's positives, uniformly;
  * with at least G-1 negatives, G-1 distinct ones are drawn without replacement;
  * with fewer, every negative is used once and the remaining slots are drawn with replacement.

Batch (numpy, shapes fixed for a given config; S = max_document_tokens, T = `decoder_length`):
  enc_ids, enc_mask   int32 [B*G, S]  unique passages, deduplicated within each of the k row blocks
                                      (block c: rows [c*B*G/k, (c+1)*B*G/k), its padding rows after its
                                      last unique passage)
  passage_index       int32 [B, G]    row of enc_ids holding pair (b, g); duplicates in one block share a
                                      row, and a pair's row always lies in its own block (the per-pair
                                      gather stays on the batch shard: `step.gather_rows`)
  dec_ids, dec_mask   int32 [B, T]    decoder prompt per query
  labels              float32 [B, G]  1.0 at g=0, 0.0 elsewhere
  teacher             float32 [B, G]  teacher P(yes) from pos_scores/neg_scores, NaN where absent
  teacher_mask        float32 [B, G]  1.0 where teacher is present
  example_id          int32 [B]       position of the example in the input JSONL (for debugging / checks)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from kalm_jax.data import batch as batch_contract
from kalm_jax.data.tfds_builder import data_source
from kalm_jax.text import prompts
from kalm_jax.text.spm import Tokenizer

STATE_VERSION = 1  # of `TrainingIterator.get_state`


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Input pipeline settings.

    Attributes:
      batch_size: queries per batch on this host (B).
      group_size: passages per query (G = 1 positive + G-1 negatives).
      max_document_tokens: S, encoder length (the ``<Document>: `` prefix included).
      max_query_tokens: query truncation before it is put into the prompt.
      decoder_length: T; None derives it from the template, `max_query_tokens` and a margin (see
        `decoder_length`).
      seed: shuffling and group-sampling seed.
      num_epochs: passes over the records; None repeats forever.
      shuffle: shuffle record order each epoch.
      instruction: task instruction (None: default; False: stage-1 prompt without instruction).
      system: system instruction (None: default).
      use_example_prompt: an example's ``prompt`` field, when present, overrides `instruction`.
      worker_count: Grain worker processes (0: in the main process); batches do not depend on it.
      worker_buffer_size: batches buffered per worker.
      batch_shards: k, the batch shards (row blocks of the batch on distinct devices) on this host; each
        deduplicates its own passages (which records a batch holds does not depend on k). Must divide
        `batch_size`.
    """

    batch_size: int = 16
    group_size: int = 16
    max_document_tokens: int = prompts.TRAIN_DOCUMENT_MAX_TOKENS
    max_query_tokens: int = prompts.TRAIN_QUERY_MAX_TOKENS
    decoder_length: int | None = None
    seed: int = 0
    num_epochs: int | None = None
    shuffle: bool = True
    instruction: str | bool | None = None
    system: str | None = None
    use_example_prompt: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 1
    batch_shards: int = 1

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (one positive and at least one negative), got {self.group_size}")
        if self.batch_size < 1 or self.max_document_tokens < 1 or self.max_query_tokens < 1:
            raise ValueError(f"batch_size, max_document_tokens and max_query_tokens must be positive: {self}")
        if self.batch_shards < 1 or self.batch_size % self.batch_shards:
            raise ValueError(f"batch_shards={self.batch_shards} must be >= 1 and divide batch_size={self.batch_size}")
        if self.worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {self.worker_count}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> PipelineConfig:
        """From a dict or `ml_collections.ConfigDict`; unknown keys raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - fields
        if unknown:
            raise ValueError(f"unknown pipeline config keys {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**dict(cfg))


def decoder_length(tokenizer: Tokenizer, config: PipelineConfig) -> int:
    """T: `config.decoder_length`, or template tokens + max_query_tokens + 8 rounded up to a multiple of 8.

    The margin absorbs re-tokenization of a truncated query in context; a longer prompt (e.g. a long
    per-example instruction) gets its query cut further to fit, never a changed shape.
    """
    if config.decoder_length is not None:
        return config.decoder_length
    overhead = prompts.decoder_template_tokens(tokenizer, config.instruction, config.system)
    return -(-(overhead + config.max_query_tokens + 8) // 8) * 8


def batch_shapes(config: PipelineConfig, dec_len: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every batch entry (`kalm_jax.data.batch`) for this pipeline's settings."""
    return batch_contract.batch_shapes(config.batch_size, config.group_size, config.max_document_tokens, dec_len)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def sample_group(num_pos: int, num_neg: int, group_size: int, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """(positive index, negative indices [G-1]) following the module's sampling rule."""
    pos = int(rng.integers(num_pos))
    need = group_size - 1
    if num_neg >= need:
        neg = rng.choice(num_neg, size=need, replace=False)
    else:
        extra = rng.integers(num_neg, size=need - num_neg)
        neg = np.concatenate([rng.permutation(num_neg), extra])
    return pos, neg.astype(np.int64)


class SampleAndTokenize(grain.transforms.RandomMap):
    """One stored example -> one tokenized group (numpy arrays, fixed shapes)."""

    def __init__(self, tokenizer: Tokenizer, config: PipelineConfig, dec_len: int):
        self.tokenizer = tokenizer
        self.config = config
        self.dec_len = dec_len

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        cfg, tok = self.config, self.tokenizer
        pos = [_text(p) for p in element["pos"]]
        neg = [_text(n) for n in element["neg"]]
        source = _text(element["source"])
        if not pos or not neg:
            raise ValueError(f"{source}: example has {len(pos)} positives and {len(neg)} negatives; need >= 1 each")
        p, n = sample_group(len(pos), len(neg), cfg.group_size, rng)
        passages = [pos[p]] + [neg[i] for i in n]
        enc_ids, enc_mask = prompts.tokenize_documents(
            tok, passages, cfg.max_document_tokens, length=cfg.max_document_tokens
        )
        instruction = cfg.instruction
        if cfg.use_example_prompt and bool(element["has_prompt"]):
            instruction = _text(element["prompt"])
        try:
            dec_ids, dec_mask = prompts.tokenize_decoder_prompts(
                tok, [_text(element["query"])], instruction, cfg.system, cfg.max_query_tokens, length=self.dec_len
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
        teacher = np.full(cfg.group_size, np.nan, np.float32)
        if bool(element["has_scores"]):
            pos_scores = np.asarray(element["pos_scores"], np.float32)
            neg_scores = np.asarray(element["neg_scores"], np.float32)
            teacher[0] = pos_scores[p]
            teacher[1:] = neg_scores[n]
        labels = np.zeros(cfg.group_size, np.float32)
        labels[0] = 1.0
        return {
            "enc_ids": enc_ids,
            "enc_mask": enc_mask,
            "dec_ids": dec_ids[0],
            "dec_mask": dec_mask[0],
            "labels": labels,
            "teacher": teacher,
            "teacher_mask": np.isfinite(teacher).astype(np.float32),
            "example_id": np.int32(element["example_id"]),
        }


class CollateGroups:
    """Stacks B groups; deduplicates the passages of each of `shards` equal row blocks separately into
    ``enc_ids [B*G, S]`` + ``passage_index [B, G]`` (block c's pairs point into block c's rows)."""

    def __init__(self, pad_id: int, shards: int = 1):
        self.pad_id = pad_id
        self.shards = shards

    def __call__(self, groups: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        b = len(groups)
        g, s = groups[0]["enc_ids"].shape
        if b % self.shards:
            raise ValueError(f"batch of {b} groups does not split into {self.shards} shards")
        rows = np.concatenate([x["enc_ids"] for x in groups]).reshape(b * g, s)
        masks = np.concatenate([x["enc_mask"] for x in groups]).reshape(b * g, s)
        enc_ids = np.full((b * g, s), self.pad_id, np.int32)
        enc_mask = np.zeros((b * g, s), np.int32)
        index = np.empty(b * g, np.int32)
        block = b * g // self.shards
        for lo in range(0, b * g, block):
            _, first, inverse = np.unique(rows[lo : lo + block], axis=0, return_index=True, return_inverse=True)
            order = np.argsort(first)
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            enc_ids[lo : lo + order.size] = rows[lo + first[order]]
            enc_mask[lo : lo + order.size] = masks[lo + first[order]]
            index[lo : lo + block] = lo + rank[inverse.reshape(-1)]
        out = {"enc_ids": enc_ids, "enc_mask": enc_mask, "passage_index": index.reshape(b, g)}
        for key in ("dec_ids", "dec_mask", "labels", "teacher", "teacher_mask", "example_id"):
            out[key] = np.stack([x[key] for x in groups])
        return out


class ShardedBatchSampler:
    """Grain sampler of one host: its rows of every global batch, in one global order of the records.

    The global stream is Grain's `IndexSampler` over all records (no sharding): one permutation of the
    records per epoch from (seed, epoch), each record's rng from (seed, position in the stream). Global batch
    t is the stream's positions [t*GB, (t+1)*GB), GB = B * process_count (B = ``batch_size``, per host); host p
    contributes rows [p*B, (p+1)*B), which its ``batch_shards`` batch shards split in order. So step t's
    global batch is the same records, in the same row order, with the same sampled groups, for any mesh,
    process count and `worker_count`. `start_batch` starts the stream at global batch `start_batch` (resuming).

    The DataLoader visits this host's indices p + m*P (Grain's `ShardOptions(p, P)`), and with W worker
    processes worker w batches every W-th of them (the workers' batches alternate); `position` maps such an
    index to its place in the global stream. With finite `num_epochs` the length covers whole rounds of W
    batches: `TrainingIterator` stops after the last whole global batch.
    """

    def __init__(
        self, num_records: int, config: PipelineConfig, process_index: int, process_count: int, start_batch: int = 0
    ):
        self.batch_size, self.global_batch = config.batch_size, config.batch_size * process_count
        self.process_index, self.process_count, self.start_batch = process_index, process_count, start_batch
        self.workers = max(1, config.worker_count)
        self._shard_options = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count)
        self.order = grain.samplers.IndexSampler(
            num_records=num_records,
            shard_options=grain.sharding.NoSharding(),
            shuffle=config.shuffle,
            num_epochs=None,
            seed=config.seed,
        )
        total = total_batches(num_records, config, process_count)
        if total is None:
            self._len = None
        else:
            rounds = -(-max(0, total - start_batch) // self.workers)
            self._len = rounds * self.workers * self.global_batch

    def __len__(self) -> int:
        import sys

        return sys.maxsize if self._len is None else self._len

    def position(self, index: int) -> int:
        """Position in the global stream of the DataLoader's `index` (p + m*P: this host's m-th record)."""
        m = index // self.process_count
        worker, i = m % self.workers, m // self.workers  # worker `worker`'s i-th record ...
        u, row = divmod(i, self.batch_size)  # ... is row `row` of its u-th batch, this host's batch u*W + worker
        batch = self.start_batch + u * self.workers + worker
        return batch * self.global_batch + self.process_index * self.batch_size + row

    def __getitem__(self, index: int):
        if index < 0 or (self._len is not None and index >= self._len):
            raise IndexError(f"sampler index {index} out of range [0, {len(self)})")
        meta = self.order[self.position(index)]
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)

    def __repr__(self) -> str:
        return (
            f"ShardedBatchSampler(rows {self.process_index * self.batch_size}.."
            f"{(self.process_index + 1) * self.batch_size - 1} of global batches of {self.global_batch} from "
            f"global batch {self.start_batch}, {self.workers} worker(s), {self.order!r})"
        )


def total_batches(num_records: int, config: PipelineConfig, process_count: int) -> int | None:
    """Global batches of the stream: whole batches of `num_epochs` passes; None when it repeats forever."""
    if config.num_epochs is None:
        return None
    return config.num_epochs * num_records // (config.batch_size * process_count)


class LegacyIteratorState(ValueError):
    """A data-iterator state in Grain's per-process format, written before the input order was global."""


class TrainingIterator:
    """This host's training batches (`make_loader`), resumable on any mesh and process count.

    Its state (`get_state` / `set_state`, JSON bytes) is the number of global batches consumed and the
    settings that fix the global order (records, global batch size, seed, shuffle, epochs): the same bytes on
    every host of every mesh. `set_state` refuses a state of another order (ValueError naming the settings)
    and continues with a fresh Grain DataLoader at the saved global batch (`seek`).
    """

    def __init__(
        self, source: Any, tokenizer: Tokenizer, config: PipelineConfig, process_index: int, process_count: int
    ):
        self._args = (source, tokenizer, config, process_index, process_count)
        self.settings = {
            "num_records": len(source),
            "global_batch_size": config.batch_size * process_count,
            "seed": config.seed,
            "shuffle": config.shuffle,
            "num_epochs": config.num_epochs,
        }
        self.total = total_batches(len(source), config, process_count)
        self.seek(0)

    def seek(self, global_batches: int) -> None:
        """Continues at global batch `global_batches` of the stream."""
        source, tokenizer, config, p, n = self._args
        self.global_batches = int(global_batches)
        self._it = iter(
            make_loader(source, tokenizer, config, process_index=p, process_count=n, start_batch=self.global_batches)
        )

    def __iter__(self) -> TrainingIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.total is not None and self.global_batches >= self.total:
            raise StopIteration
        batch = next(self._it)
        self.global_batches += 1
        return batch

    def get_state(self) -> bytes:
        return json.dumps(
            {"version": STATE_VERSION, "global_batches": self.global_batches, **self.settings}, indent=1, sort_keys=True
        ).encode()

    def set_state(self, state: bytes) -> None:
        try:
            saved = json.loads(state)
        except ValueError as e:
            raise ValueError(f"not a data-iterator state ({e})") from None
        if isinstance(saved, dict) and "last_seen_indices" in saved:
            raise LegacyIteratorState(
                "a data-iterator state in Grain's per-process format, written before the input order was one global "
                "order (it depends on the mesh that wrote it)"
            )
        if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION or "global_batches" not in saved:
            raise ValueError(f"not a data-iterator state of version {STATE_VERSION}: {str(saved)[:200]}")
        diff = [f"{k} {saved.get(k)!r} when saved, {v!r} now" for k, v in self.settings.items() if saved.get(k) != v]
        if diff:
            raise ValueError("the data-iterator state is of another input order: " + ", ".join(diff))
        self.seek(saved["global_batches"])

    def start_prefetch(self) -> None:
        self._it.start_prefetch()


def make_loader(
    source: Any,
    tokenizer: Tokenizer,
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    start_batch: int = 0,
) -> grain.DataLoader:
    """A Grain DataLoader over a random-access `source` of this host's rows of the global batches, from global
    batch `start_batch` (`ShardedBatchSampler`). Iterate it through `TrainingIterator` (which stops after the
    last whole global batch when `num_epochs` is set, and saves a mesh-independent state).

    `process_index` / `process_count` default to `jax.process_index()` / `jax.process_count()`.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if len(source) < process_count * config.batch_size:
        raise ValueError(
            f"{len(source)} examples are fewer than one batch of {config.batch_size} on each of {process_count} hosts"
        )
    sampler = ShardedBatchSampler(len(source), config, process_index, process_count, start_batch)
    if config.worker_count > 0:
        _allow_grain_workers_outside_absl_app()
    dec_len = decoder_length(tokenizer, config)
    operations = [
        SampleAndTokenize(tokenizer, config, dec_len),
        grain.transforms.Batch(
            config.batch_size, drop_remainder=True, batch_fn=CollateGroups(tokenizer.pad_id, config.batch_shards)
        ),
    ]
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=config.worker_count,
        worker_buffer_size=config.worker_buffer_size,
    )


def _allow_grain_workers_outside_absl_app() -> None:
    """Grain's worker processes read absl flags; outside `absl.app.run` they are unparsed, so use defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def training_iterator(
    data_dir: str | Path,
    tokenizer: Tokenizer,
    config: PipelineConfig,
    *,
    name: str = "default",
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    state: bytes | None = None,
):
    """`TrainingIterator` of this host's training batches over a prepared dataset; pass a saved `state` (from
    any host of any mesh) to resume.

    The returned iterator has ``get_state() -> bytes`` and ``set_state(bytes)``.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    it = TrainingIterator(data_source(data_dir, name, split), tokenizer, config, process_index, process_count)
    if state is not None:
        it.set_state(state)
    return it


def steps_per_epoch(num_records: int, config: PipelineConfig, process_count: int) -> int:
    """Whole global batches per epoch (every host yields this many; run this many steps per epoch)."""
    return num_records // (config.batch_size * process_count)
