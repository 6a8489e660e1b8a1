"""Resumable evaluation sweeps: datasets × checkpoints × instructions × ratios.

`run_sweep(config)` evaluates the first stage of every dataset (always), then, per checkpoint, encodes the
candidate passages once into a `PassageStore` and reranks every (instruction, ratio) cell over it. Each
finished cell is appended at once (flushed and fsynced) to ``OUT/results.jsonl``; a rerun skips cells
already there, so an interrupted sweep finishes only what is missing and never overwrites a finished
result. ``OUT/sweep_config.json`` records the settings results depend on; an output directory holding
results of different settings is refused (the grid lists themselves may grow between runs).

Each line of results.jsonl: ``dataset``, ``split``, ``stage`` ("first_stage" | "rerank"), ``checkpoint``
(null for the first stage), ``ratio`` (null for the first stage), ``instruction``, ``metrics`` (trec_eval
measure names → floats, plus ``roc_auc``), and for rerank rows ``cost`` (cache bytes, online seconds per
query, ...). Run files land in ``OUT/runs/<dataset>/<cell>.trec.gz``; the report in ``OUT/summary.md``.

With several JAX processes (`eval.py --num_processes=N ...`, docs/multihost.md) every process runs the same
sweep: each builds an engine over its local devices, encodes its part of every store shard, and reranks
its contiguous block of the queries (`query_block`); the blocks' runs are gathered (`gather_blocks`) and
process 0 alone writes results.jsonl, run files, the store manifest and the report.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax

from kalm_jax.checkpoints import loader
from kalm_jax.data.beir import BeirDataset, load_beir
from kalm_jax.data.trec import read_run, write_run
from kalm_jax.evaluation import metrics, rerank
from kalm_jax.evaluation import results as results_lib
from kalm_jax.evaluation import store as store_lib
from kalm_jax.evaluation.results import CONFIG_FILE, RESULTS, cell_key, read_results
from kalm_jax.evaluation.settings import DEFAULT_LABEL, NONE_LABEL, Settings, SweepConfigError
from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.parallel import distributed

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- naming
def _slug(text: str, limit: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s[-limit:] or "x"


def checkpoint_slug(path: str) -> str:
    """A directory-safe name for a checkpoint path: its tail plus a short hash of the full path."""
    return f"{_slug(Path(path).name or path, 32)}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def instruction_slug(label: str) -> str:
    return label if label in (DEFAULT_LABEL, NONE_LABEL) else f"i{hashlib.sha256(label.encode()).hexdigest()[:8]}"


# ------------------------------------------------------------------------------------------- datasets
@dataclasses.dataclass
class Prepared:
    """One dataset ready to rerank: its (possibly subset) queries and qrels, and the first-stage run."""

    name: str
    data: BeirDataset
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    run: dict[str, dict[str, float]]
    relevance_level: int
    warnings: dict[str, int]

    @property
    def candidates(self) -> list[str]:
        return list(dict.fromkeys(d for q in self.queries for d in self.run.get(q, {})))


def _first_stage_path(settings: Settings, dataset: str) -> Path | None:
    if settings.first_stage == "bm25":
        return None
    p = Path(settings.first_stage[len("run:") :])
    return p if p.is_absolute() else settings.data_dir / dataset / p


def check_inputs(settings: Settings) -> None:
    """Fails fast, before any heavy work, on missing dataset files, run files or checkpoints."""
    problems = []
    for name in settings.datasets:
        d = settings.data_dir / name
        if not d.is_dir():
            problems.append(f"dataset {name!r}: {d} is not a directory")
            continue
        for stem in ("corpus.jsonl", "queries.jsonl"):
            if not ((d / stem).is_file() or (d / f"{stem}.gz").is_file()):
                problems.append(f"dataset {name!r}: {d} has neither {stem} nor {stem}.gz")
        if not (d / "qrels" / f"{settings.split}.tsv").is_file():
            problems.append(f"dataset {name!r}: {d / 'qrels' / (settings.split + '.tsv')} does not exist")
        rp = _first_stage_path(settings, name)
        if rp is not None and not rp.is_file():
            problems.append(f"dataset {name!r}: first-stage run {rp} does not exist")
    for ck in settings.checkpoints:
        if not Path(ck).exists():
            problems.append(f"checkpoint {ck} does not exist")
    if problems:
        raise FileNotFoundError("cannot start the sweep:\n  " + "\n  ".join(problems))


def prepare_dataset(settings: Settings, name: str) -> Prepared:
    """Loads a dataset split, its first `max_queries` queries and the first-stage run (cached in OUT/runs)."""
    data = load_beir(settings.data_dir / name, settings.split, on_missing="keep")
    warnings = {k: v for k, v in data.skipped.counts.items() if v}
    queries = dict(data.queries)
    if settings.max_queries:
        queries = dict(list(queries.items())[: settings.max_queries])
    qrels = {q: data.qrels[q] for q in queries if q in data.qrels}
    level = settings.relevance_level or metrics.relevance_level_for(name)
    cached = settings.output_dir / "runs" / name / "first_stage.trec.gz"
    if cached.is_file():
        run = read_run(cached)
    elif settings.first_stage == "bm25":
        from kalm_jax.data.bm25 import BM25Index

        logging.getLogger("bm25s").setLevel(logging.WARNING)
        index = BM25Index.build(data.corpus, show_progress=settings.progress)
        run = index.search(queries, settings.top_k, show_progress=settings.progress)
        write_run(run, cached, tag="bm25")
    else:
        path = _first_stage_path(settings, name)
        full = read_run(path)
        run = {q: full.get(q, {}) for q in queries}
        unknown = sorted({d for docs in run.values() for d in docs if d not in data.corpus})
        if unknown:
            msg = f"{path}: {len(unknown)} docs of the run are not in {name}'s corpus, e.g. {unknown[:5]}"
            if settings.on_unknown_docs == "error":
                raise ValueError(msg + "; set on_unknown_docs='drop' to drop them (they cannot be reranked)")
            log.warning("%s; dropping them", msg)
            warnings["run docs not in corpus"] = len(unknown)
            run = {q: {d: s for d, s in docs.items() if d in data.corpus} for q, docs in run.items()}
        run = {
            q: dict(sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))[: settings.top_k]) for q, docs in run.items()
        }
        write_run(run, cached, tag="first_stage")
    empty = [q for q in queries if not run.get(q)]
    if empty:
        log.warning(
            "%s: %d of %d queries have no first-stage candidates (they score 0), e.g. %s",
            name,
            len(empty),
            len(queries),
            empty[:3],
        )
        warnings["queries without candidates"] = len(empty)
    for reason, count in warnings.items():
        log.warning("%s/%s: %d × %s", name, settings.split, count, reason)
    return Prepared(name, data, queries, qrels, run, level, warnings)


def _metrics(settings: Settings, prep: Prepared, run: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    cutoffs = sorted({10, 100, settings.top_k})
    m = metrics.evaluate(prep.qrels, run, relevance_level=prep.relevance_level, recall_cutoffs=cutoffs)
    m["roc_auc"] = metrics.roc_auc(prep.qrels, run, relevance_level=prep.relevance_level)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------- identities
def path_identity(path: str | Path) -> str:
    """A cheap identity of a file or directory tree: sha256 over (relative path, size, mtime) of its files.

    A checkpoint or dataset replaced at the same path gets another identity (a copy that preserves
    modification times and sizes of every file is, by design, the same data).
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256(str(root.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def data_identity(settings: Settings, dataset: str) -> str:
    """Identity of one dataset's files (and of an external first-stage run file) under `settings.data_dir`."""
    ident = path_identity(settings.data_dir / dataset)
    run = _first_stage_path(settings, dataset)
    if run is not None and not run.resolve().is_relative_to((settings.data_dir / dataset).resolve()):
        ident = hashlib.sha256(f"{ident}{path_identity(run)}".encode()).hexdigest()[:16]
    return ident


def check_identities(out: Path, rows, identities: Mapping[str, Mapping[str, str]]) -> None:
    """Refuses to add results for a dataset or checkpoint whose files changed since earlier rows were written."""
    problems = []
    for row in rows:
        ds, ck = row.get("dataset"), row.get("checkpoint")
        now = identities["data"].get(ds)
        if now is not None and row.get("data_identity") not in (None, now):
            problems.append(f"dataset {ds!r}: its files changed since {row.get('finished')} (data_dir or contents)")
        now = identities["checkpoint"].get(ck)
        if ck and now is not None and row.get("checkpoint_identity") not in (None, now):
            problems.append(f"checkpoint {ck}: replaced since its results of {row.get('finished')}")
    if problems:
        raise SweepConfigError(
            f"{out} holds results of other data or models under the same names:\n  "
            + "\n  ".join(dict.fromkeys(problems))
            + "\nuse a new output_dir (finished results are never overwritten or mixed)"
        )


# ------------------------------------------------------------------------------------------- the sweep
ModelLoader = Callable[[str, Settings], tuple[Any, Any]]


def load_checkpoint(path: str, settings: Settings):
    """(model, tokenizer) for a checkpoint path, through the one loader (`kalm_jax.checkpoints.loader.load`)."""
    _, model, tokenizer = loader.load(path, dtype=settings.dtype, tokenizer=settings.tokenizer or None)
    return model, tokenizer


def run_sweep(config, *, load_model: ModelLoader = load_checkpoint) -> list[dict[str, Any]]:
    """Runs every missing cell of the grid; returns all rows of OUT/results.jsonl afterwards.

    Holds OUT's lock throughout (`results.output_job_lock`): a second run on the same directory fails clearly. In a
    multi-process run process 0 holds it for the job (it alone writes the results), and every process learns
    whether it got it."""
    settings = config if isinstance(config, Settings) else Settings.from_config(config)
    with results_lib.output_job_lock(settings.output_dir):
        return _run_sweep_locked(settings, load_model=load_model)


def _run_sweep_locked(config, *, load_model: ModelLoader = load_checkpoint) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    settings = config if isinstance(config, Settings) else Settings.from_config(config)
    check_inputs(settings)
    distributed.primary_first(lambda: results_lib.check_output_dir(settings), "sweep_output_dir")
    out = settings.output_dir
    existing = read_results(out)
    identities = {
        "data": {ds: data_identity(settings, ds) for ds in settings.datasets},
        "checkpoint": {ck: path_identity(ck) for ck in settings.checkpoints},
    }
    check_identities(out, existing, identities)
    done = {cell_key(r) for r in existing}
    split = settings.split

    def todo_cells(ds: str, ck: str) -> list[tuple[str, int]]:
        return [
            (ins, r)
            for ins in settings.instructions
            for r in settings.ratios
            if (ds, split, "rerank", ck, r, ins) not in done
        ]

    n_cells = len(settings.datasets) * (
        1 + len(settings.checkpoints) * len(settings.instructions) * len(settings.ratios)
    )
    primary = distributed.is_primary()
    bar = tqdm(
        total=n_cells,
        desc="sweep cells",
        unit="cell",
        disable=not settings.progress or not primary,
        dynamic_ncols=True,
        position=0,
    )
    bar.update(sum(1 for k in done if k[0] in settings.datasets and k[1] == split))
    prepared: dict[str, Prepared] = {}
    try:
        for ds in settings.datasets:
            prep = prepared[ds] = distributed.primary_first(
                lambda ds=ds: prepare_dataset(settings, ds), f"sweep_prepare:{ds}"
            )
            key = (ds, split, "first_stage", None, None, None)
            if key not in done:
                row = {
                    "dataset": ds,
                    "split": split,
                    "stage": "first_stage",
                    "checkpoint": None,
                    "ratio": None,
                    "instruction": None,
                    "metrics": _metrics(settings, prep, prep.run),
                    "first_stage": settings.first_stage,
                    "queries": len(prep.queries),
                    "relevance_level": prep.relevance_level,
                    "warnings": prep.warnings,
                    "run_file": f"runs/{ds}/first_stage.trec.gz",
                    "data_identity": identities["data"][ds],
                    "finished": _now(),
                }
                if primary:
                    results_lib.append(out, row)
                done.add(key)
                bar.update(1)
        for ck in settings.checkpoints:
            if not any(todo_cells(ds, ck) for ds in settings.datasets):
                continue
            model, tokenizer = load_model(ck, settings)
            engine = InferenceEngine(
                model,
                tokenizer,
                batch_size=settings.encode_batch_size,
                max_document_tokens=settings.max_document_tokens,
                max_query_tokens=settings.max_query_tokens,
                show_progress=False,
                quantization=settings.quantization or None,
                device_states=settings.device_states,
            )
            key = store_lib.StoreKey.for_engine(engine, settings.finest_ratio, settings.storage)
            for ds in settings.datasets:
                cells = todo_cells(ds, ck)
                if not cells:
                    continue
                prep = prepared[ds]
                root = (settings.store_dir or out / "store") / checkpoint_slug(ck) / ds
                st = distributed.primary_first(
                    lambda root=root, key=key: store_lib.PassageStore.open(
                        root, key, on_stale=settings.on_stale, lock_timeout=settings.store_lock_timeout
                    ),
                    f"sweep_store:{root}",
                )
                encoded = st.ensure(
                    engine,
                    _Texts(prep.data),
                    prep.candidates,
                    shard_size=settings.shard_size,
                    progress=settings.progress and primary,
                )
                block = query_block(list(prep.queries))
                for ins in dict.fromkeys(i for i, _ in cells):
                    rows = rerank.tokenize_prompts(
                        engine,
                        {q: prep.queries[q] for q in block},
                        settings.instruction_value(ins),
                        system=settings.system or None,
                    )
                    for _, ratio in (c for c in cells if c[0] == ins):
                        for r in dict.fromkeys([ratio, *(settings.cascade_pair[:1] if settings.cascade_pair else [])]):
                            distributed.primary_first(lambda st=st, r=r: st.shards_at(r), f"sweep_ratio:{root}:{r}")
                        res = rerank.rerank(
                            engine,
                            rows,
                            prep.run,
                            st,
                            ratio,
                            top_k=settings.top_k,
                            cascade=settings.cascade_pair,
                            batch_pairs=settings.batch_pairs,
                            progress=settings.progress and primary,
                            desc=f"{ds} r={ratio}",
                        )
                        res = gather_blocks(res, list(prep.queries))
                        run_file = f"runs/{ds}/{checkpoint_slug(ck)}.{instruction_slug(ins)}.r{ratio}.trec.gz"
                        if primary:
                            write_run(res.run, out / run_file, tag=f"kalm_r{ratio}")
                        size = st.sizes(ratio)
                        cost = {
                            "cache_bytes": size["bytes"],
                            "cache_bytes_per_passage": size["bytes_per_passage"],
                            "state_bytes_per_passage": size["state_bytes_per_passage"],
                            "cached_passages": size["passages"],
                            "storage": settings.storage,
                            "online_seconds_per_query": res.seconds_per_query,
                            "online_seconds": res.online_seconds,
                            "compile_seconds": res.compile_seconds,
                            "pairs": res.pairs,
                            "devices": len(engine.devices) * jax.process_count(),
                            "processes": jax.process_count(),
                            "encoded_passages": encoded,
                        }
                        row = {
                            "dataset": ds,
                            "split": split,
                            "stage": "rerank",
                            "checkpoint": ck,
                            "ratio": ratio,
                            "instruction": ins,
                            "metrics": _metrics(settings, prep, res.run),
                            "cost": cost,
                            "queries": len(prep.queries),
                            "relevance_level": prep.relevance_level,
                            "model_fingerprint": key.model,
                            "store": str(root),
                            "run_file": run_file,
                            "data_identity": identities["data"][ds],
                            "checkpoint_identity": identities["checkpoint"][ck],
                            "finished": _now(),
                        }
                        if primary:
                            results_lib.append(out, row)
                        done.add(cell_key(row))
                        encoded = 0  # the encode cost belongs to the first cell that needed it
                        bar.update(1)
    finally:
        bar.close()
    distributed.barrier("sweep_done")
    rows = read_results(out)
    if settings.report and primary:
        from kalm_jax.evaluation import report

        report.write_report(out, rows)
    return rows


def query_block(qids: list[str]) -> list[str]:
    """This process's contiguous block of `qids` (all of them with one process)."""
    n, p = jax.process_count(), jax.process_index()
    return qids[len(qids) * p // n : len(qids) * (p + 1) // n]


def gather_blocks(res: rerank.RerankOutput, qids: list[str]) -> rerank.RerankOutput:
    """Every process's `RerankOutput` of its query block -> the whole run (in `qids` order) on every process;
    pairs add up, online and compile seconds are the slowest process's (wall time)."""
    if jax.process_count() == 1:
        return res
    parts = distributed.allgather_json(
        {"run": res.run, "pairs": res.pairs, "online": res.online_seconds, "compile": res.compile_seconds}
    )
    merged = {q: d for part in parts for q, d in part["run"].items()}
    return rerank.RerankOutput(
        {q: merged[q] for q in qids if q in merged},
        len(qids),
        sum(p["pairs"] for p in parts),
        max(p["online"] for p in parts),
        max(p["compile"] for p in parts),
    )


class _Texts(Mapping):
    """doc id -> `passage_text`, computed on access (no copy of the corpus)."""

    def __init__(self, data: BeirDataset):
        self.data = data

    def __getitem__(self, key):
        return self.data.passage(key)

    def __contains__(self, key):
        return key in self.data.corpus

    def __iter__(self):
        return iter(self.data.corpus)

    def __len__(self):
        return len(self.data.corpus)


__all__ = [
    "run_sweep",
    "Settings",
    "read_results",
    "cell_key",
    "load_checkpoint",
    "prepare_dataset",
    "check_inputs",
    "checkpoint_slug",
    "SweepConfigError",
    "RESULTS",
    "CONFIG_FILE",
]
