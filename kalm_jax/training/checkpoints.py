"""Training checkpoints: an Orbax CheckpointManager over `<workdir>/checkpoints/<step>/`.

Each step directory holds the items
  params/        the full parameter tree (`t5gemma2.param_tree(model)` layout, LoRA factors incl.)
  train_state/   {"step", "opt_state"}
  kalm_model/    kalm_model.json = `orbax_io.model_meta(model)` (so `orbax_io.load_any` works)
  data_iter/     the data-iterator state (`pipeline.TrainingIterator`: the position in the global batch
                 stream, the same on every process and mesh), one file per process
Saves are asynchronous; the manager keeps the last `keep` steps plus the `keep_best` best by
`best_metric`. Restoring takes the abstract state of the *current* `TrainStep`, so a run resumes onto
another mesh shape and process count (the data iterator is set from its own process's file, or any
process's when the process count changed).

Integrity and safety of resuming:
- once a step is complete, `<step>/checksums.json` records the sha256 of every file of its `params`,
  `train_state` and `kalm_model` items (`kalm_jax.checkpoints.integrity`); it is verified before the step is restored;
- `kalm_model.json` records `train_settings` (`training.config.train_settings`: the settings the saved
  train state depends on). Resuming with a different value, or with a train state of another structure,
  raises `SettingsMismatch` naming the settings, and touches nothing;
- only real corruption (a checksum mismatch, a missing/truncated file, an unreadable step) makes a step
  unusable: it is moved (never deleted) to `<workdir>/corrupt_checkpoints/<step>[.n]` with a warning and the
  previous step is used. A corrupt step with no older step to fall back to is an error and stays in place.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from kalm_jax import atomic
from kalm_jax.checkpoints import integrity
from kalm_jax.data.pipeline import LegacyIteratorState

log = logging.getLogger(__name__)

ITEMS = ("params", "train_state", "kalm_model", "data_iter")
SEALED_ITEMS = ("params", "train_state", "kalm_model")


class SettingsMismatch(ValueError):
    """The checkpoint was written with settings that change the train state; resuming would be wrong."""


class CorruptCheckpoint(ValueError):
    """A checkpoint step cannot be used (checksum mismatch, missing or unreadable files)."""


_STRUCTURE_HINTS = ("tree structures do not match", "do not match", "incompatible", "mismatch", "shape")


class Checkpointer:
    """Saves and restores train states of one run directory."""

    def __init__(self, workdir: str | Path, ckpt_cfg: Any, settings: dict[str, Any] | None = None):
        """`settings`: `training.config.train_settings(config)` of this run (recorded, and compared on restore)."""
        self.workdir = Path(workdir).absolute()
        self.root = self.workdir / "checkpoints"
        self.cfg = ckpt_cfg
        self.settings = None if settings is None else json.loads(json.dumps(settings))
        self.metric = str(ckpt_cfg.best_metric)
        self.manager = self._make_manager()
        self._sealer: threading.Thread | None = None
        self._pending: int | None = None  # the step of the last save started (maybe still writing)
        self._failed: atomic.DiskFullError | None = None
        self._failed_step: int | None = None

    def _make_manager(self) -> ocp.CheckpointManager:
        keep = [policies.LatestN(n=max(1, int(self.cfg.keep)))]
        if int(self.cfg.keep_best) > 0:
            metric = self.metric
            keep.append(
                policies.BestN(
                    get_metric_fn=lambda m: m[metric],
                    reverse=False,
                    n=int(self.cfg.keep_best),
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(self.cfg.async_save),
            preservation_policy=policies.AnyPreservationPolicy(keep),
            create=True,
            cleanup_tmp_directories=True,
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train_state": ocp.StandardCheckpointHandler(),
            "kalm_model": ocp.JsonCheckpointHandler(filename="kalm_model.json"),
            "data_iter": grain.checkpoint.CheckpointHandler(),
        }
        return ocp.CheckpointManager(self.root, options=options, item_names=ITEMS, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, state: dict, meta: dict, data_iter: Any | None, *, metrics: dict | None = None, force: bool = False
    ) -> bool:
        """Starts an (async) save of `state` at `state["step"]`; returns whether a save was started."""
        step = int(jax.device_get(state["step"]))
        if step in self.manager.all_steps():
            return False
        if self.settings is not None:
            meta = {**meta, "train_settings": self.settings}
        args = {
            "params": ocp.args.StandardSave(state["params"]),
            "train_state": ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
            "kalm_model": ocp.args.JsonSave(meta),
        }
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        clean = None
        if metrics is not None:
            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.metric and int(self.cfg.keep_best) > 0 and (clean is None or self.metric not in clean):
            clean = None  # BestN only ranks steps that carry the metric
        self._join_sealer()
        self.check()  # a failed earlier (async) save stops the run before another starts
        try:
            started = self.manager.save(step, args=ocp.args.Composite(**args), metrics=clean, force=force)
        except Exception as e:  # noqa: BLE001 - a full disk is named; anything else propagates unchanged
            self._raise_if_disk_full(e, [step, self._pending])
            raise
        self._pending = step if started else self._pending
        if started and jax.process_index() == 0:
            # `manager.save` waited for the previous (async) save, so every older step is committed: hash them
            # in the background (file reads only; no Orbax calls off the main thread). This step is sealed by
            # the next save or by `wait`/`close`.
            self._sealer = threading.Thread(
                target=self.seal, kwargs={"exclude": step}, daemon=True, name="checkpoint-checksums"
            )
            self._sealer.start()
        return started

    def check(self) -> None:
        """Raises `DiskFullError` naming the step directory when a finished asynchronous save failed for lack
        of space (its partial directory is removed first). Cheap and non-blocking: the loop calls it every
        step, so a run stops at the first failed save instead of training on without checkpoints."""
        if self._failed is not None:
            raise self._failed
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._raise_if_disk_full(e, [self._pending])
            raise

    def _raise_if_disk_full(self, err: BaseException, steps: list[int | None]) -> None:
        """`err` as a `DiskFullError` naming the step being written, after removing its partial directory."""
        text = str(err)
        if not (
            atomic.as_disk_full(err, self.root) is not None
            or "RESOURCE_EXHAUSTED" in text
            or "No space left on device" in text
        ):
            return
        written = [s for s in steps if s is not None]
        step = next((s for s in written if f"/{s}.orbax-checkpoint-tmp" in text), written[0] if written else None)
        where = self.root / str(step) if step is not None else self.root
        self._remove_partial(step)
        # Orbax's commit threads of the failed save may still write into it (they end at the latest at interpreter
        # shutdown, before atexit handlers run): remove it again on close and at exit.
        self._failed_step = step
        atexit.register(self._remove_partial, step)
        first = next((ln for ln in text.splitlines() if ln.strip()), type(err).__name__)[:300]
        self._failed = atomic.DiskFullError(
            errno.ENOSPC,
            f"{where}: the disk is full; checkpoint step {step} was not saved and its partial "
            f"directory was removed. Free space and rerun the same command to resume from the last saved step "
            f"({first})",
        )
        raise self._failed from None

    def _remove_partial(self, step: int | None) -> None:
        """Deletes what an unfinished save of `step` left (`<step>.orbax-checkpoint-tmp*`); committed steps stay."""
        if step is None or not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(p, ignore_errors=True)

    def _join_sealer(self) -> None:
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None

    def seal(self, exclude: int | None = None) -> None:
        """Writes `<step>/checksums.json` for every committed step that has none (process 0 only)."""
        if jax.process_index() != 0 or not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if not p.name.isdigit() or int(p.name) == exclude or integrity.has_checksums(p):
                continue
            try:
                integrity.write(p, SEALED_ITEMS)
            except OSError as e:  # e.g. the step was just removed by the keep policy: nothing to seal
                log.warning("could not write checksums for %s: %s", p, e)

    def wait(self) -> None:
        """Waits for the pending save, then writes the checksums of every committed step. Raises
        `DiskFullError` (see `check`) when a save failed for lack of space."""
        if self._failed is not None:
            raise self._failed
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._raise_if_disk_full(e, [self._pending])
            raise
        self._join_sealer()
        self.seal()

    def restore(self, abstract_state: dict, data_iter: Any | None) -> tuple[dict, int] | None:
        """Restores the newest usable step into `abstract_state`'s shapes/shardings.

        Returns (state, step), or None when there is no checkpoint. `data_iter` (if given) is set to the
        saved iterator position. Raises `SettingsMismatch` when the newest step was written with settings
        that change the train state (nothing is moved), and `CorruptCheckpoint` when a corrupt step has no
        older step to fall back to. A corrupt step with an older one is quarantined (moved, never deleted).
        """
        while True:
            step = self.manager.latest_step()
            if step is None:
                return None
            try:
                self.check_settings(step)
                return self._restore_step(step, abstract_state, data_iter), step
            except CorruptCheckpoint as e:
                older = [s for s in self.steps() if s < step]
                if not older:
                    raise CorruptCheckpoint(
                        f"{e}\nNo older checkpoint to fall back to; {self.root / str(step)} is left in place. Move "
                        "it aside to start this run from scratch, or use a new --workdir."
                    ) from None
                dest = self._quarantine(step)
                log.warning(
                    "checkpoint %s/%d cannot be restored, it is corrupt (%s); moved it to %s, resuming from step %d",
                    self.root,
                    step,
                    e,
                    dest,
                    older[-1],
                )

    def _quarantine(self, step: int) -> Path:
        """Moves a corrupt step to <workdir>/corrupt_checkpoints/<step>[.n] (a free name; nothing deleted)."""
        self.manager.close()
        base = self.workdir / "corrupt_checkpoints"
        base.mkdir(parents=True, exist_ok=True)
        dest, n = base / str(step), 0
        while dest.exists():
            n += 1
            dest = base / f"{step}.{n}"
        shutil.move(str(self.root / str(step)), str(dest))
        self.manager = self._make_manager()
        return dest

    def check_settings(self, step: int) -> None:
        """Raises `SettingsMismatch` naming each train-state setting that differs from the step's record."""
        meta_path = self.root / str(step) / "kalm_model" / "kalm_model.json"
        if self.settings is None or not meta_path.is_file():
            return
        try:
            saved = json.loads(meta_path.read_text()).get("train_settings")
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpoint(f"{meta_path}: not valid JSON ({e})") from None
        if not isinstance(saved, dict):
            return  # written before settings were recorded: the structure check in _restore_step applies
        from kalm_jax.training.config import LATER_SETTINGS

        recorded_later = any(k.startswith(LATER_SETTINGS) for k in saved)  # else written before they were recorded
        keys = sorted(set(saved) | {k for k in self.settings if recorded_later or not k.startswith(LATER_SETTINGS)})
        diff = [
            f"{k}: checkpoint {saved.get(k, '<unset>')!r}, now {self.settings.get(k, '<unset>')!r}"
            for k in keys
            if saved.get(k) != self.settings.get(k)
        ]
        if diff:
            raise SettingsMismatch(
                f"{self.root / str(step)} was written with different settings that change the train state:\n  "
                + "\n  ".join(diff)
                + "\nResume with the checkpoint's values, or start a new run in another "
                "--workdir (the checkpoints are left untouched)."
            )

    def _restore_step(self, step: int, abstract_state: dict, data_iter: Any | None) -> dict:
        d = self.root / str(step)
        try:
            verified = integrity.verify(d)
        except integrity.IntegrityError as e:
            raise CorruptCheckpoint(str(e)) from None
        if data_iter is not None:
            self._restore_data_iter(d, step, data_iter)
        abstract_ts = {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}
        args = {
            "params": ocp.args.StandardRestore(abstract_state["params"]),
            "train_state": ocp.args.StandardRestore(abstract_ts),
        }
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - classified below: a different structure vs a broken file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            if verified or any(h in str(e).lower() for h in _STRUCTURE_HINTS):
                raise SettingsMismatch(
                    f"{d}: its train state does not fit the current configuration ({type(e).__name__}: {first}). "
                    "A setting that changes the parameter or optimiser state differs from the run that wrote it "
                    "(model, LoRA, optimizer.grad_accum_steps, optimizer.clip_norm, ...); resume with the original "
                    "settings or use a new --workdir (the checkpoints are left untouched)."
                ) from None
            raise CorruptCheckpoint(f"{d}: cannot be read ({type(e).__name__}: {first})") from None
        ts = out["train_state"]
        restored_step = int(jax.device_get(ts["step"]))
        if restored_step != step:
            raise CorruptCheckpoint(f"{d}: train_state step {restored_step} does not match the directory")
        return {"step": ts["step"], "params": out["params"], "opt_state": ts["opt_state"]}

    @staticmethod
    def _restore_data_iter(d: Path, step: int, data_iter: Any) -> None:
        """Sets `data_iter` to the position saved in step dir `d`: this process's file, or (another process count
        wrote the step) any process's, as the state is the same on every process. A state in Grain's own
        per-process format (written before the global order) continues at global batch `step` (one per step)."""
        own = d / "data_iter" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        files = [own] if own.is_file() else sorted((d / "data_iter").glob("process_*-of-*.json"))
        if not files:
            raise CorruptCheckpoint(f"{d / 'data_iter'}: no data-iterator state (process_<i>-of-<N>.json)")
        try:
            data_iter.set_state(files[0].read_bytes())
        except LegacyIteratorState as e:
            log.warning("%s: %s; continuing the global order at batch %d", files[0], e, step)
            data_iter.seek(step)
        except ValueError as e:
            raise SettingsMismatch(
                f"{files[0]}: {e}. Resume with the settings of the run that wrote it, or start a "
                "new run in another --workdir (the checkpoints are left untouched)."
            ) from None
        except OSError as e:
            raise CorruptCheckpoint(f"{files[0]}: cannot be read ({e})") from None

    def close(self) -> None:
        """Waits for the pending save (see `wait`) and closes the manager; after a failed save it only closes
        (the failure was already raised)."""
        if self._failed is not None:
            self._join_sealer()
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001 - the save's failure was reported; this is its echo
                log.debug("closing the checkpoint manager after a failed save: %s", e)
            self._remove_partial(self._failed_step)
            return
        try:
            self.wait()
        finally:
            if self._failed is None:
                self.manager.close()
            else:
                self.close()


__all__ = ["Checkpointer", "ITEMS", "SettingsMismatch", "CorruptCheckpoint"]
