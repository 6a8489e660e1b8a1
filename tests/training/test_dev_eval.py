"""Dev evaluation during training scores with the training state's own sharded arrays, on the training mesh:
the same run as an engine over a host copy of the weights, and no parameter is copied or read to the host.
(Two real processes: tests/integration/test_multihost_training.py::test_dev_evaluation_runs_on_two_processes.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax._src.array import ArrayImpl
from jax.experimental import multihost_utils

from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.parallel import mesh as sharding
from kalm_jax.training.config import default_config
from kalm_jax.training.dev_eval import DevSet
from kalm_jax.training.state import model_kwargs
from kalm_jax.training.step import make_train_step


def test_dev_eval_scores_on_the_training_mesh_without_copying_the_weights(tokenizer, data_dir, monkeypatch):
    cfg = default_config()
    cfg.data.batch_size, cfg.data.group_size, cfg.data.max_document_tokens, cfg.data.decoder_length = 8, 2, 32, 32
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    ts = make_train_step(get_preset("tiny"), cfg, mesh, yes_id=tokenizer.yes_id, no_id=tokenizer.no_id, donate=False)
    model = build_model(get_preset("tiny"), **model_kwargs(cfg))
    dev = DevSet.build(
        data_dir / "scifact", "test", tokenizer, num_queries=3, depth=5, max_document_tokens=32, max_query_tokens=16
    )
    want = dev.rerank(model, tokenizer, ratio=4)  # an engine over a copy of the weights on this process's devices

    state = ts.init_state(model)
    params = jax.tree.leaves(state["params"])
    assert any(not p.sharding.is_fully_replicated for p in params)  # the weights really are sharded
    ids = {id(p) for p in params}
    touched: list[str] = []

    def spy(name, real, leaves_of):
        def wrapper(*args, **kwargs):
            touched.extend(f"{name} {x.shape}" for x in leaves_of(*args) if id(x) in ids)
            return real(*args, **kwargs)

        return wrapper

    first_arg = lambda x, *_: jax.tree.leaves(x)  # noqa: E731
    monkeypatch.setattr(ArrayImpl, "__array__", spy("np.asarray", ArrayImpl.__array__, lambda self, *_: [self]))
    monkeypatch.setattr(jax, "device_get", spy("jax.device_get", jax.device_get, first_arg))
    monkeypatch.setattr(jax, "device_put", spy("jax.device_put", jax.device_put, first_arg))
    monkeypatch.setattr(
        multihost_utils, "process_allgather", spy("process_allgather", multihost_utils.process_allgather, first_arg)
    )
    got = dev.rerank(ts.model(state), tokenizer, ratio=4, mesh=ts.mesh, batch_axes=ts.rules.get(sharding.BATCH))
    assert not touched, f"dev evaluation copied or read the training weights: {touched[:5]}"
    assert got.keys() == want.keys()
    for q in want:
        assert got[q].keys() == want[q].keys()
        np.testing.assert_allclose([got[q][d] for d in want[q]], [want[q][d] for d in want[q]], atol=2e-5, rtol=0)
    assert dev.ndcg10(got) == pytest.approx(dev.ndcg10(want), abs=1e-9)
