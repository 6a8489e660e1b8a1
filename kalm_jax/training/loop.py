"""`train_and_evaluate(config, workdir)`: the training run behind `train.py`.

Order of work: validate the config; find or build the training data (the given JSONL files, or hard
negatives mined with BM25 from a BEIR split), the tokenizer (given, next to `init_from`, or trained on the
training corpus and saved as `<workdir>/tokenizer.model`), the TFDS/Grain pipeline; build or load the model;
build the mesh and the sharded train step; resume from `<workdir>/checkpoints` when it holds a step; run
the steps with metrics (console, `<workdir>/metrics.jsonl`, TensorBoard), periodic dev nDCG@10 and
checkpoints; save on SIGTERM; stop on a non-finite loss without saving it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from kalm_jax import atomic, locks
from kalm_jax.checkpoints import loader, orbax_io
from kalm_jax.data import pipeline
from kalm_jax.data.batch import STEP_KEYS
from kalm_jax.model import quantization
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.parallel import distributed
from kalm_jax.parallel import mesh as sharding
from kalm_jax.perf import flops
from kalm_jax.text import prompts
from kalm_jax.text.hf_json import AnyTokenizer, check_vocab
from kalm_jax.text.load import copy_tokenizer, has_tokenizer, load_tokenizer
from kalm_jax.text.spm import MODEL_FILENAME, Tokenizer
from kalm_jax.training.checkpoints import Checkpointer, SettingsMismatch
from kalm_jax.training.config import ratio_weights, resolve_total_steps, train_settings, validate
from kalm_jax.training.state import model_kwargs
from kalm_jax.training.step import TrainStep, make_train_step

log = logging.getLogger(__name__)


# bf16 peak FLOP/s per device, for the MFU estimate (override with config.peak_flops_per_device).
def data_root(config) -> Path:
    root = config.data.data_dir or os.environ.get("KALM_DATA_DIR", "")
    if not root:
        raise ValueError("no BEIR data directory: set --config.data.data_dir or KALM_DATA_DIR")
    return Path(root)


def instruction_of(config) -> str | bool | None:
    """`data.instruction` as a prompt instruction (`prompts.resolve_instruction`: "default", "none"/"" or the text)."""
    return prompts.resolve_instruction(str(config.data.instruction))


def training_files(config, workdir: Path) -> list[Path]:
    """The training JSONL files: `data.train_jsonl`, or `<workdir>/data/train.jsonl` mined from BEIR."""
    if config.data.train_jsonl:
        files = [Path(f) for f in config.data.train_jsonl]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"data.train_jsonl: no such files {missing}")
        return files
    out = workdir / "data" / f"{config.data.dataset}-{config.data.split}.jsonl"
    if not out.is_file():
        from kalm_jax.data.beir import load_beir
        from kalm_jax.data.bm25 import BM25Index
        from kalm_jax.data.negatives import mine_hard_negatives
        from kalm_jax.data.training_jsonl import write_training_jsonl

        ds = load_beir(data_root(config) / config.data.dataset, config.data.split)
        log.info(
            "mining hard negatives: %s/%s, %d judged queries", config.data.dataset, config.data.split, len(ds.qrels)
        )
        index = BM25Index.build(ds.corpus, show_progress=False)
        run = index.search(ds.queries, k=int(config.data.negatives_depth), show_progress=False)
        examples = mine_hard_negatives(
            ds,
            run,
            num_negatives=int(config.data.num_negatives),
            seed=int(config.seed),
            sample_end=int(config.data.negatives_depth),
            show_progress=False,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        write_training_jsonl(examples, out)
        log.info("wrote %d training groups to %s", len(examples), out)
    return [out]


def run_tokenizer(config, workdir: Path, files: list[Path]) -> AnyTokenizer:
    """The run's tokenizer: `config.tokenizer`, else the workdir's (a resumed run), else the init_from
    checkpoint's own (``tokenizer.model`` or ``tokenizer.json``, via `kalm_jax.checkpoints.loader`), else one trained on
    the training texts (only when training from scratch). The chosen file is kept in the workdir.

    The workdir's tokenizer is never replaced: a `config.tokenizer` whose content differs from it raises
    `SettingsMismatch` naming both files (its checkpoints were trained with the workdir's)."""
    kept = has_tokenizer(workdir)
    if config.tokenizer:
        tok = load_tokenizer(config.tokenizer)
        if kept:
            own = load_tokenizer(workdir)
            if own.fingerprint() != tok.fingerprint():
                raise SettingsMismatch(
                    f"tokenizer: --config.tokenizer={config.tokenizer} (sha256 {tok.fingerprint()[:16]}) is not the "
                    f"tokenizer this workdir was trained with, {getattr(own, 'path', None) or workdir} (sha256 "
                    f"{own.fingerprint()[:16]}); resume without --config.tokenizer (the workdir's is used) or start "
                    "a new run in another --workdir (the workdir's tokenizer is never replaced)"
                )
            return own
    elif kept:
        return load_tokenizer(workdir)
    elif config.init_from:
        tok = loader.find_tokenizer(config.init_from)
    else:
        tok = None
    if tok is not None:
        if jax.process_index() == 0:
            copy_tokenizer(tok, workdir)
        return tok
    from kalm_jax.data.training_jsonl import read_training_jsonl

    texts: list[str] = []
    for f in files:
        for ex in read_training_jsonl(f):
            texts.append(ex.query)
            texts.extend(ex.pos)
            texts.extend(ex.neg)
    texts = list(dict.fromkeys(texts))
    log.info("training a SentencePiece tokenizer (vocab %d) on %d texts", config.tokenizer_vocab_size, len(texts))
    Tokenizer.train(texts, workdir, vocab_size=int(config.tokenizer_vocab_size))
    return Tokenizer.load(workdir / MODEL_FILENAME)


def initial_model(config, tok: AnyTokenizer):
    """(model config, the model the run trains): `init_from` loaded (LoRA added unless it has adapters),
    else the preset drawn from `config.seed`; every parameter, LoRA factors included, in `model.param_dtype`."""
    base = None
    if config.init_from:
        model_cfg, base, _ = loader.load(config.init_from, dtype=config.model.param_dtype, tokenizer=tok)
        if quantization.mode_of(base) != "none":
            raise ValueError(
                f"init_from={config.init_from} holds quantized weights ({quantization.mode_of(base)}): "
                "training updates float weights; start from the float checkpoint it was quantized from"
            )
    else:
        model_cfg = get_preset(config.model.preset)
        check_vocab(tok, model_cfg.vocab_size, where=str(getattr(tok, "path", None) or "the run's tokenizer"))
    kwargs = model_kwargs(config, lora_dtype=config.model.param_dtype)
    return model_cfg, build_model(model_cfg, seed=int(config.seed), base=base, **kwargs)


def local_batch_shards(ts: TrainStep) -> int:
    """k: the batch shards (row blocks of the global batch on distinct devices) this process holds.

    Raises ValueError unless they are the contiguous rows [p*B/P, (p+1)*B/P) of the global batch B, i.e.
    the mesh's batch axes split the batch across the P processes in process order.
    """
    b, g = ts.abstract_batch["passage_index"].shape
    index_sharding = ts.batch_shardings["passage_index"]
    rows = index_sharding.shard_shape((b, g))[0]
    starts = sorted({idx[0].start or 0 for idx in index_sharding.addressable_devices_indices_map((b, g)).values()})
    p, n = jax.process_index(), jax.process_count()
    per_process = b // n
    expected = [p * per_process + c * rows for c in range(max(1, per_process // rows))]
    if rows * n > b or starts != expected:
        raise ValueError(
            f"process {p} of {n} holds batch rows starting at {starts} (shards of {rows} rows) of the "
            f"global batch {b}; each process must hold its own contiguous {per_process} rows: use a mesh "
            f"whose batch axes ({ts.rules.get(sharding.BATCH)}) span all {jax.device_count()} "
            f"devices' processes in order (e.g. mesh.fsdp=-1)"
        )
    return len(starts)


def global_batch(local: dict, ts: TrainStep) -> dict:
    """Process-local numpy batch (this process's k batch shards) -> global sharded arrays.

    `passage_index` is made global (offset by this process's first row) and checked to stay within each
    batch shard's own rows, as the step's shard-local gather requires.
    """
    local = dict(local)
    b_local, g = local["passage_index"].shape
    rows = local["enc_ids"].shape[0]
    local["passage_index"] = local["passage_index"] + jax.process_index() * rows
    blocks = ts.passage_shards // jax.process_count()
    if ts.passage_shards > 1:
        index = local["passage_index"].reshape(blocks, -1) - jax.process_index() * rows
        lo = (np.arange(blocks) * (rows // blocks))[:, None]
        if ((index < lo) | (index >= lo + rows // blocks)).any():
            raise ValueError(
                f"batch passage_index points outside its batch shard ({blocks} shards of "
                f"{b_local // blocks} queries on this process): the pipeline's batch_shards must "
                f"equal the local batch shards"
            )
    if jax.process_count() == 1:
        return ts.place_batch(local)
    return {k: jax.make_array_from_process_local_data(ts.batch_shardings[k], np.asarray(local[k])) for k in STEP_KEYS}


def flops_per_step(model_cfg, config, dec_len: int) -> float:
    """6·N·tokens estimate: encoder params × encoder tokens + decoder params × decoder tokens × ratios."""
    counts = model_cfg.param_counts()
    b, g = int(config.data.batch_size), int(config.data.group_size)
    enc_tokens = b * g * int(config.data.max_document_tokens)
    dec_tokens = b * g * dec_len * len(ratio_weights(config))
    return 6.0 * (counts["encoder"] * enc_tokens + counts["decoder"] * dec_tokens)


def peak_flops(config) -> float:
    if float(config.peak_flops_per_device) > 0:
        return float(config.peak_flops_per_device)
    return flops.peak_flops(jax.devices()[0].device_kind)


class MetricsWriter:
    """metrics.jsonl (one JSON object per step) + TensorBoard; only process 0 writes."""

    def __init__(self, workdir: Path, tensorboard: bool, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():  # drop lines past the resumed step (they were not checkpointed)
            kept = [ln for ln in self._rows() if ln[1].get("step", 0) <= resume_step]
            atomic.write_text(self.path, "".join(text + "\n" for text, _ in kept))
        self.file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def _rows(self) -> list[tuple[str, dict]]:
        """(line, parsed row) of metrics.jsonl; a torn last line (a kill mid-write) is dropped with a warning."""
        lines = [ln for ln in self.path.read_text(errors="replace").splitlines() if ln.strip()]
        rows = []
        for i, ln in enumerate(lines, 1):
            try:
                row = json.loads(ln)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if i == len(lines):
                    log.warning("%s: dropping a torn last line (an interrupted write): %r", self.path, ln[:80])
                    continue
                raise ValueError(f"{self.path}:{i}: not a JSON object ({e}); fix or move the file to resume") from None
            rows.append((ln, row))
        return rows

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (then saves and exits)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading_main():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after this step and exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train_and_evaluate(config: Any, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains per `config` in `workdir` (resuming if it holds checkpoints); returns the final metrics.

    The config is validated before anything else (`training.config.validate`). The run holds the workdir's
    lock throughout (`locks.job_lock`: process 0 holds it, every process learns the outcome): a second run on
    the same workdir fails at once with `locks.DirectoryLocked` naming the holder."""
    validate(config)
    workdir = Path(workdir).absolute()
    with locks.job_lock(
        workdir,
        "training run",
        "wait for it to finish or use another --workdir (two runs would write the same checkpoints and metrics)",
    ):
        return _train_and_evaluate_locked(config, workdir)


def _train_and_evaluate_locked(config: Any, workdir: Path) -> dict[str, float]:
    tfds_dir = workdir / "tfds"
    from kalm_jax.data.tfds_builder import prepare

    # Process 0 writes the shared files (workdir on a shared filesystem), then the others read them.
    for turn in ("primary", "others"):
        if (turn == "primary") == distributed.is_primary():
            workdir.mkdir(parents=True, exist_ok=True)
            files = training_files(config, workdir)
            tok = run_tokenizer(config, workdir, files)
            prepared = prepare({"train": [str(f) for f in files]}, tfds_dir, name="train")
        distributed.barrier(f"kalm_train_inputs_{turn}")
    if float(config.epochs) > 0:
        import tensorflow_datasets as tfds

        groups = tfds.builder_from_directory(str(prepared)).info.splits["train"].num_examples
        steps = resolve_total_steps(config, groups)
        log.info(
            "epochs=%s over %d training groups at batch %d: %d steps",
            config.epochs,
            groups,
            int(config.data.batch_size),
            steps,
        )
        with config.unlocked():
            config.total_steps = steps
    if int(config.data.batch_size) % jax.process_count():
        raise ValueError(f"data.batch_size {config.data.batch_size} does not split over {jax.process_count()} hosts")
    pcfg = pipeline.PipelineConfig(
        batch_size=int(config.data.batch_size) // jax.process_count(),
        group_size=int(config.data.group_size),
        max_document_tokens=int(config.data.max_document_tokens),
        max_query_tokens=int(config.data.max_query_tokens),
        decoder_length=int(config.data.decoder_length) or None,
        seed=int(config.seed),
        instruction=instruction_of(config),
        use_example_prompt=bool(config.data.use_example_prompt),
        worker_count=int(config.data.worker_count),
    )
    dec_len = pipeline.decoder_length(tok, pcfg)

    model_cfg, model = initial_model(config, tok)
    mesh = sharding.make_mesh(config.mesh)
    ts = make_train_step(
        model_cfg, config, mesh, yes_id=tok.yes_id, no_id=tok.no_id, decoder_length=dec_len, shard_local_passages=True
    )
    pcfg = dataclasses.replace(pcfg, batch_shards=local_batch_shards(ts))
    log.info(
        "model %s; trainable: %s\n%s",
        config.model.preset if not config.init_from else config.init_from,
        "LoRA factors" if config.lora.enabled else "all parameters",
        sharding.summary(ts.abstract_state["params"], ts.param_axes, ts.state_shardings["params"], mesh),
    )
    if jax.process_index() == 0:
        print(
            sharding.summary(ts.abstract_state["params"], ts.param_axes, ts.state_shardings["params"], mesh), flush=True
        )

    it = pipeline.training_iterator(tfds_dir, tok, pcfg, name="train")
    ckpt = Checkpointer(workdir, config.checkpoint, settings=train_settings(config, tok.fingerprint()))
    restored = ckpt.restore(ts.abstract_state, it)
    if restored is not None:
        state, start = restored
        log.info("resumed from %s/checkpoints/%d", workdir, start)
    else:
        state, start = ts.init_state(model), 0
    if distributed.is_primary():  # only after the resume check: a refused run keeps the original record
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1, sort_keys=True))
    del model
    meta = orbax_io.model_meta(ts.model(state))

    dev = None
    if int(config.eval.num_queries) > 0:
        from kalm_jax.training.dev_eval import DevSet

        dev = DevSet.build(
            data_root(config) / config.eval.dataset,
            config.eval.split,
            tok,
            num_queries=int(config.eval.num_queries),
            depth=int(config.eval.depth),
            max_document_tokens=int(config.data.max_document_tokens),
            max_query_tokens=int(config.data.max_query_tokens),
            instruction=instruction_of(config),
        )

    def evaluate() -> dict[str, float]:
        if dev is None:
            return {}
        # on the training mesh, with the state's own sharded arrays: no weight copy, no host gather
        return dev.evaluate(
            ts.model(state),
            tok,
            ratio=int(config.eval.ratio),
            batch_size=int(config.eval.batch_size),
            mesh=ts.mesh,
            batch_axes=ts.rules.get(sharding.BATCH),
        )

    writer = MetricsWriter(workdir, bool(config.tensorboard), start)
    total = int(config.total_steps)
    step_flops = flops_per_step(model_cfg, config, dec_len)
    peak = peak_flops(config) * jax.device_count()
    result: dict[str, float] = {}
    if start == 0 and dev is not None:
        result = {f"initial_{k}": v for k, v in evaluate().items()}
        log.info("before training: %s", result)
        writer.write(0, result)
    last_saved = start if restored is not None else None
    bar = tqdm(total=total, initial=start, desc="train", disable=not sys.stderr.isatty() or jax.process_index() != 0)
    every_ckpt, every_eval, every_log = int(config.checkpoint.every), int(config.eval.every), int(config.log_every)
    try:
        with _Preemption() as preempt:
            step = start
            while step < total:
                t0 = time.perf_counter()
                local = next(it)
                tokens = (
                    float(np.sum(local["enc_mask"]) + np.sum(local["dec_mask"]) * local["labels"].shape[1])
                    * jax.process_count()
                )
                batch = global_batch(local, ts)
                if step == start and jax.process_count() > 1:
                    # Every process compiles the step, then they meet: a cross-process communicator (gloo on
                    # CPU) is created at the step's first run and gives up when a process is 30 s late.
                    ts.fn.lower(state, batch).compile()
                    distributed.barrier("kalm_train_step_compiled")
                state, metrics = ts.fn(state, batch)
                step += 1
                ckpt.check()  # a failed (async) save stops the run here: DiskFullError naming its step
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                if not math.isfinite(m["loss"]):
                    raise FloatingPointError(
                        f"non-finite loss {m['loss']} at step {step} "
                        f"({ {k: v for k, v in m.items() if 'loss' in k} }); "
                        f"stopping without saving this state. Last good checkpoint: "
                        f"{f'{ckpt.root}/{last_saved}' if last_saved is not None else 'none'}. "
                        "Lower optimizer.lr, check the data, or raise optimizer.warmup_steps."
                    )
                m.update(step_time_s=dt, tokens_per_s=tokens / dt)
                if peak:
                    m["mfu"] = step_flops / dt / peak
                if dev is not None and every_eval and step % every_eval == 0 and step < total:
                    m.update(evaluate())
                if step == total and dev is not None:
                    m.update(evaluate())
                writer.write(step, m)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                if step % every_log == 0 or step == total or step == start + 1:
                    log.info(
                        "step %d/%d loss %.4f %s grad_norm %.3f lr %.2e %.3fs/step %.0f tok/s%s",
                        step,
                        total,
                        m["loss"],
                        " ".join(f"r{r}={m[f'loss/r{r}']:.3f}" for r, _ in ratio_weights(config)),
                        m["grad_norm"],
                        m["lr"],
                        dt,
                        m["tokens_per_s"],
                        f" mfu {m['mfu']:.1%}" if "mfu" in m else "",
                    )
                stop = distributed.any_process(preempt.requested)  # every process stops at the same step
                due = (every_ckpt and step % every_ckpt == 0) or step == total or stop
                if due and ckpt.save(state, meta, it, metrics=m, force=True):
                    last_saved = step
                result.update(m)
                if stop:
                    log.warning("preempted at step %d: checkpoint saved, exiting", step)
                    break
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    return result


__all__ = ["train_and_evaluate", "training_files", "run_tokenizer", "flops_per_step"]
