"""Train-step rows of the benchmark.

`build_step` returns a `TrainStep` (a jitted step already compiled for one batch, plus rotated inputs)
or a string saying why train rows are skipped. It builds `kalm_jax.training.step.make_train_step`
for one query × `train_batch` passages at one ratio and times its compiled executable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass
class TrainStep:
    fn: Callable[..., Any]  # fn(*inputs[i]) runs one optimisation step and returns device arrays
    inputs: Sequence[tuple]
    compile_s: float | None


def build_step(cfg, settings, mode: str) -> TrainStep | str:
    """A compiled train step for preset `cfg` in `mode` ("full" or "lora"), or the reason it is skipped."""
    try:
        return _make(cfg, settings, mode)
    except NotImplementedError as err:
        return str(err)


def _make(cfg, settings, mode: str) -> TrainStep:
    """One query × `train_batch` passages at the single MEP ratio `train_r`, so the step does exactly the
    work `flops.train_flops` counts per example; fp32 master weights, compute in `settings.dtype`,
    one device (the benchmark measures a single accelerator)."""
    import jax
    import numpy as np

    from kalm_jax.model.build import build_model
    from kalm_jax.model.options import ModelOptions
    from kalm_jax.parallel import mesh as sharding
    from kalm_jax.perf.bench.timing import compile_aot
    from kalm_jax.training import config as train_config
    from kalm_jax.training.state import model_kwargs
    from kalm_jax.training.step import make_train_step

    c = train_config.default_config()
    c.model.param_dtype = "float32"
    c.model.compute_dtype = settings.dtype
    c.lora.enabled = mode == "lora"
    c.data.batch_size = 1
    c.data.group_size = int(settings.train_batch)
    c.data.max_document_tokens = int(settings.train_n)
    c.data.decoder_length = int(settings.prompt_len)
    c.mep.ratios = (int(settings.train_r),)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    yes_id, no_id = 3, 4
    options = ModelOptions(attention_impl=settings.attention_impl)
    ts = make_train_step(cfg, c, mesh, yes_id=yes_id, no_id=no_id, options=options)
    state = ts.init_state(build_model(cfg, seed=settings.seed, **model_kwargs(c, options=options)))
    rng = np.random.default_rng(settings.seed)
    g, n, t = int(settings.train_batch), int(settings.train_n), int(settings.prompt_len)
    hi = cfg.boi_token_index

    def batch():
        return ts.place_batch(
            {
                "enc_ids": rng.integers(3, hi, (g, n)).astype(np.int32),
                "enc_mask": np.ones((g, n), np.int32),
                "passage_index": np.arange(g, dtype=np.int32)[None],
                "dec_ids": rng.integers(3, hi, (1, t)).astype(np.int32),
                "dec_mask": np.ones((1, t), np.int32),
                "labels": np.eye(1, g, dtype=np.float32),
                "teacher": np.full((1, g), np.nan, np.float32),
                "teacher_mask": np.zeros((1, g), np.float32),
            }
        )

    batches = [batch() for _ in range(max(2, int(settings.rotations)))]
    compiled, compile_s = compile_aot(ts.fn, ts.abstract_state, ts.abstract_batch)
    holder = {"state": state}

    def run(b):
        holder["state"], metrics = compiled(holder["state"], b)
        return metrics["loss"]

    return TrainStep(run, [(b,) for b in batches], compile_s)
