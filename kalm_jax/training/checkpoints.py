"""Training checkpoints: an Orbax CheckpointManager over `<workdir>/checkpoints/<step>/`.

Each step directory holds the items
  params/        the full parameter tree (`checkpointing.param_tree(model)` layout, LoRA factors incl.)
  train_state/   {"step", "opt_state"}
  kalm_model/    kalm_model.json = `checkpointing.model_meta(model)` (so `checkpointing.load_any` works)
  data_iter/     the Grain iterator state, one file per process
Saves are asynchronous; the manager keeps the last `keep` steps plus the `keep_best` best by
`best_metric`. Restoring takes the abstract state of the *current* `TrainStep`, so a run resumes onto
another mesh shape. A latest step that fails to restore (truncated or corrupt files) is moved to
`<workdir>/corrupt_checkpoints/<step>` with a warning and the previous step is used.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)

ITEMS = ("params", "train_state", "kalm_model", "data_iter")


class Checkpointer:
    """Saves and restores train states of one run directory."""

    def __init__(self, workdir: str | Path, ckpt_cfg: Any):
        self.workdir = Path(workdir).absolute()
        self.root = self.workdir / "checkpoints"
        self.cfg = ckpt_cfg
        self.metric = str(ckpt_cfg.best_metric)
        self.manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        keep = [policies.LatestN(n=max(1, int(self.cfg.keep)))]
        if int(self.cfg.keep_best) > 0:
            metric = self.metric
            keep.append(policies.BestN(get_metric_fn=lambda m: m[metric], reverse=False,
                                       n=int(self.cfg.keep_best), keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(self.cfg.async_save),
            preservation_policy=policies.AnyPreservationPolicy(keep), create=True,
            cleanup_tmp_directories=True)
        handlers = {"params": ocp.StandardCheckpointHandler(), "train_state": ocp.StandardCheckpointHandler(),
                    "kalm_model": ocp.JsonCheckpointHandler(filename="kalm_model.json"),
                    "data_iter": grain.checkpoint.CheckpointHandler()}
        return ocp.CheckpointManager(self.root, options=options, item_names=ITEMS, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: dict, meta: dict, data_iter: Any | None, *, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Starts an (async) save of `state` at `state["step"]`; returns whether a save was started."""
        step = int(jax.device_get(state["step"]))
        if step in self.manager.all_steps():
            return False
        args = {"params": ocp.args.StandardSave(state["params"]),
                "train_state": ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
                "kalm_model": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        clean = None
        if metrics is not None:
            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.metric and int(self.cfg.keep_best) > 0 and (clean is None or self.metric not in clean):
            clean = None  # BestN only ranks steps that carry the metric
        return self.manager.save(step, args=ocp.args.Composite(**args), metrics=clean, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state: dict, data_iter: Any | None) -> tuple[dict, int] | None:
        """Restores the newest loadable step into `abstract_state`'s shapes/shardings.

        Returns (state, step), or None when there is no checkpoint. `data_iter` (if given) is set to the
        saved iterator position.
        """
        while True:
            step = self.manager.latest_step()
            if step is None:
                return None
            try:
                return self._restore_step(step, abstract_state, data_iter), step
            except Exception as e:  # noqa: BLE001 - any failure to read a step means it is unusable
                older = [s for s in self.steps() if s < step]
                dest = self.workdir / "corrupt_checkpoints" / str(step)
                log.warning("checkpoint %s/%d cannot be restored (%s: %s); moving it to %s and using %s",
                            self.root, step, type(e).__name__, str(e).splitlines()[0][:300], dest,
                            f"step {older[-1]}" if older else "a fresh start")
                self.manager.close()
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists():
                    shutil.rmtree(dest)
                shutil.move(str(self.root / str(step)), str(dest))
                self.manager = self._make_manager()

    def _restore_step(self, step: int, abstract_state: dict, data_iter: Any | None) -> dict:
        abstract_ts = {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}
        args = {"params": ocp.args.StandardRestore(abstract_state["params"]),
                "train_state": ocp.args.StandardRestore(abstract_ts)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        ts = out["train_state"]
        restored_step = int(jax.device_get(ts["step"]))
        if restored_step != step:
            raise ValueError(f"train_state step {restored_step} does not match directory {step}")
        return {"step": ts["step"], "params": out["params"], "opt_state": ts["opt_state"]}

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


__all__ = ["Checkpointer", "ITEMS"]
