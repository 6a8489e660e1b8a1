"""The hook that adds train-step rows once `kalm_jax.training` exists (branch `train`).

`build_step` returns a `TrainStep` (a jitted step already compiled for one batch, plus rotated inputs)
or a string saying why train rows are skipped. The training module is expected to provide
`make_train_step(model, *, mode, ...)`; until the branches are merged, the import fails and the rows
are skipped with that message. Wiring the real signature is a change to `_make` only.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Sequence


@dataclasses.dataclass
class TrainStep:
    fn: Callable[..., Any]  # fn(*inputs[i]) runs one optimisation step and returns device arrays
    inputs: Sequence[tuple]
    compile_s: float | None


def build_step(cfg, settings, mode: str) -> TrainStep | str:
    """A compiled train step for preset `cfg` in `mode` ("full" or "lora"), or the reason it is skipped."""
    try:
        training = importlib.import_module("kalm_jax.training")  # written on branch `train`
    except ImportError as err:
        return f"kalm_jax.training is not importable ({err}); train rows need the training branch"
    if not hasattr(training, "make_train_step"):
        return "kalm_jax.training has no make_train_step; wire it in kalm_jax/bench/train_hook.py"
    try:
        return _make(training, cfg, settings, mode)
    except NotImplementedError as err:
        return str(err)


def _make(training, cfg, settings, mode: str) -> TrainStep:
    raise NotImplementedError(
        "kalm_jax.training.make_train_step exists but bench/train_hook._make is not wired to its signature "
        "yet (done at merge): build model + optimiser state, a batch of "
        f"{settings.train_batch} (prompt {settings.prompt_len}, passage {settings.train_n}, r={settings.train_r}) "
        f"examples, compile with timing.compile_aot and return TrainStep(fn, rotated inputs, compile_s); mode={mode}")
