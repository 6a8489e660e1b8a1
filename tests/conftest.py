"""Shared fixtures: the BEIR data directory, a SentencePiece model trained on scifact, and tiny PyTorch
reference checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from child_process import TEST_XLA_FLAGS

# The CPU programs compile at LLVM optimisation level 0, in this process and every one the tests start
# (tests/child_process.py says why).
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
# Tests run on the CPU backend even where libtpu (for AOT topology descriptions) or a GPU is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session and every process the tests start (they inherit os.environ):
# the tiny train step, encode and score programs compile once, not again in each fresh process. A cache hit still
# fires JAX's backend-compile event and adds a jit cache entry, so compile counts are unchanged; the AOT tests
# turn it off (`no_compilation_cache`). A cache directory the user set is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR = tempfile.mkdtemp(prefix="kalm-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on the cache's file lock, so a process never reads an entry another is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kalm_jax.data.beir import load_corpus, passage_text  # noqa: E402
from kalm_jax.text.spm import Tokenizer  # noqa: E402


def _default_data_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def no_compilation_cache(monkeypatch):
    """This test's compiles, and those of the processes it starts, skip the persistent compilation cache: for
    the TPU AOT tests, whose costs and memory come from executables a compile-only client builds."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_enable_compilation_cache
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", before)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The BEIR-layout datasets: $KALM_DATA_DIR, else ../shared/data beside the repository."""
    path = Path(os.environ.get("KALM_DATA_DIR", _default_data_dir()))
    if not (path / "scifact").is_dir():
        raise RuntimeError(f"dataset directory {path} has no scifact/; set KALM_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def scifact_texts(data_dir) -> list[str]:
    corpus = load_corpus(data_dir / "scifact" / "corpus.jsonl.gz")
    return [passage_text(d) for d in list(corpus.values())[:3000]]


@pytest.fixture(scope="session")
def tokenizer(scifact_texts, tmp_path_factory) -> Tokenizer:
    """A SentencePiece model (vocab 4000, Gemma special-id layout) trained on 3000 scifact passages."""
    return Tokenizer.train(scifact_texts, tmp_path_factory.mktemp("spm"), vocab_size=4000)


@pytest.fixture(scope="session")
def scifact_index(data_dir):
    from kalm_jax.data.bm25 import BM25Index

    return BM25Index.build(load_corpus(data_dir / "scifact" / "corpus.jsonl.gz"), show_progress=False)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A tiny random HF T5Gemma 2 checkpoint (GQA, window 4, linear global RoPE): (dir, torch model)."""
    from torch_reference import build_tiny_hf

    d = tmp_path_factory.mktemp("tiny_hf")
    model = build_tiny_hf(d, heads=4, kv_heads=2, window=4)
    return d, model


@pytest.fixture(scope="session")
def tokenizer_json(tokenizer, tmp_path_factory):
    """tokenizer.json converted from the trained SentencePiece model by transformers' Gemma converter (the
    only tokenizer file released T5Gemma 2 / KaLM-Reranker-V1 Hub repositories ship)."""
    import types

    from transformers.convert_slow_tokenizer import GemmaConverter

    orig = types.SimpleNamespace(
        vocab_file=str(tokenizer.path),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        add_prefix_space=False,
        legacy=False,
    )
    d = tmp_path_factory.mktemp("tokjson")
    GemmaConverter(orig).converted().save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


@pytest.fixture(scope="session")
def hub_checkpoint(tokenizer_json, tmp_path_factory):
    """A Hub-style checkpoint directory as released repositories ship it: config.json, model.safetensors and
    tokenizer.json only (no tokenizer.model); tiny random T5Gemma 2 weights whose vocabulary fits the
    scifact tokenizer. Returns (directory, torch model)."""
    import shutil

    from torch_reference import build_tiny_hf

    d = tmp_path_factory.mktemp("hub") / "KaLM-Reranker-V1-Tiny"
    d.mkdir()
    torch_model = build_tiny_hf(d, vocab=4096, eoi=4093, heads=4, kv_heads=2, window=4)
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    assert not (d / "tokenizer.model").exists()
    return d, torch_model


# The slow lane: real multi-process jobs, ahead-of-time TPU compiles, subprocess training runs, the wheel test and
# the longest numerical sweeps (each several seconds to minutes on 2 cores). `pytest -m "not slow"` is the fast lane;
# CI runs everything. Entries are fnmatch patterns of "file::test-name[params]".
SLOW = (
    "test_multihost_*.py::*",
    "test_packaging.py::*",
    "test_aot.py::test_aot_",
    "test_aot.py::test_sampled_analysis",
    "test_aot.py::test_unknown_cost_ops",
    "test_aot.py::test_the_layer_scan_copies_no_weights",
    "test_aot.py::test_the_policy_working_set_is_at_least_the_compilers",
    "test_aot.py::test_analysis_accounts_the_engines_attention_kernel",
    "test_aot.py::test_tpu_q_norm_rope_and_scale",
    "test_aot.py::test_the_hbm_bound",
    "test_aot_quantized.py::test_report_rows_lower_the_engines_quantized_programs",  # 18 lowerings of the report
    "test_bench_quantized.py::test_quantized_suite_times_every_mode",
    "test_aot.py::test_the_fused_mlp_compiles_within_each_generations_vmem",  # 6 Mosaic compiles for v4 and v6e
    "test_fused_mlp.py::test_the_model_runs_the_kernel_in_every_mlp",  # the whole model, kernels interpreted
    "test_fused_mlp.py::test_gradients_are_the_references",
    "test_aot_quantized.py::test_report_rows_with_int8_states_lower",  # lowers the report's int8-state programs
    "test_training.py::test_sigkill",
    "test_training.py::test_sigterm",
    "test_training.py::test_label_writes",
    "test_training.py::test_same_loss_and_grads_on_every_mesh",
    "test_training.py::test_non_finite_loss",
    "test_training.py::test_disk_full_checkpoint",
    "test_training.py::test_lora_trains_only_adapters",
    "test_training.py::test_straight_run",
    "test_training.py::test_loss_falls",
    "test_training.py::test_second_run_on_a_locked_workdir",
    "test_training.py::test_train_step_scores_every_ratio",
    "test_convert.py::test_train_py_checkpoint",
    "test_convert.py::test_lora_merged_export",
    "test_bench.py::test_cli_tiny",
    "test_hub_checkpoint.py::test_train_py_fine_tunes",
    "test_banded_attention.py::test_blocked_equals_dense",
    "test_tpu_attention.py::test_splash_matches_xla",
    "test_engine.py::test_finer_states_served",
    "test_eval_store.py::test_two_concurrent_writers",
    "test_pipeline.py::test_global_batch_is_independent",
    "test_scoring.py::test_entry_points_equal_model_methods",
    "test_parity.py::test_margins_on_pooled_passages_match[[]*-[238]]",  # ratios 1 and 4 stay fast
    "test_training.py::test_remat_policies",
    "test_training.py::test_corrupt_latest_falls_back_onto_another_mesh",
    "test_bench.py::test_h100_suite",
    "test_serve.py::test_sigterm_drains",  # starts a second server process
    # integration tests (tests/integration: PyTorch parity, the Hub checkpoint through every job) and the other
    # checks against an outside reference implementation or a real server process: slow lane, so the fast lane
    # stays a few minutes on 2 cores
    "test_parity.py::*",
    "test_hub_checkpoint.py::*",
    "test_mteb.py::*",
    "test_serve.py::test_cohere_client*",
    "test_serve.py::test_random_request_shapes*",
    "test_convert.py::test_exported_logits_match_transformers",
    "test_convert.py::test_pytorch_recipe_matches_score_margin*",
    "test_convert.py::test_training_workdir_to_hf_to_orbax_is_identical",
    "test_scoring.py::test_array_level_functions_place_the_weights_once",
    "test_inference_policy.py::test_tensor_layout*",
    "test_eval_sweep.py::*",
    "test_model_build.py::test_options_belong*",
    "test_model_build.py::test_head_margin*",
    "test_model_build.py::test_seeds_weights*",
    "test_dev_eval.py::test_dev_eval_scores_on_the_training_mesh*",
    "test_bench.py::test_side_by_side*",
    "test_bench.py::test_model_attention_impl_switch*",
    "test_eval_store.py::test_scores_through_the_store_equal_scores_from_text",
    "test_pipeline.py::test_epoch_is_one_permutation_for_every_mesh",
    "test_pipeline.py::test_worker_processes_resume",
    "test_banded_attention.py::test_blocked_with_softcap_and_dot_product",
    # quantization: the fast lane keeps the int8 numerics, the engine and the int8 save/load; these repeat them
    "test_quantized_checkpoint.py::test_export_quantized_and_load_bit_for_bit[[]fp8]",
    "test_quantized_engine.py::test_quantized_scores_rank_like_float",
    "test_serve.py::test_quantized_server*",
)


# The files that take longest (whole-suite durations on 2 cores, longest first:
# benchmarks/2026-12-04-test-suite-slower-2-core-host-2.md), started first: with `-n 2 --dist loadfile` each
# worker runs whole files, and a long file started last would leave the other worker idle at the end.
LONGEST_FILES = (
    "perf/test_aot.py",
    "training/test_training.py",
    "integration/test_multihost_training.py",
    "serve/test_serve.py",
    "integration/test_packaging.py",
    "evaluation/test_eval_sweep.py",
    "model/test_model_build.py",
    "integration/test_hub_checkpoint.py",
    "evaluation/test_eval_store.py",
    "integration/test_parity.py",
    "checkpoints/test_convert.py",
    "inference/test_int8_device_states.py",
    "inference/test_engine.py",
)


def pytest_collection_modifyitems(config, items):
    """Marks the SLOW tests and moves the LONGEST_FILES to the front, in that order (the order within a file and
    of the other files is kept)."""
    import fnmatch

    for item in items:
        test = item.nodeid.rpartition("/")[2]
        if any(fnmatch.fnmatchcase(test, pattern + ("" if pattern.endswith(("*", "]")) else "*")) for pattern in SLOW):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0].removeprefix("tests/"), len(rank)))
