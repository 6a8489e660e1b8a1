"""`kalm-mteb` / `python -m kalm_jax.mteb`: MTEB reranking evaluation of a kalm-jax checkpoint, offline.

    kalm-mteb --config.checkpoint=CKPT --config.data_dir=DATA --config.tasks=local:scifact,local:adi \
        --config.output_dir=OUT

Runs `mteb.evaluate` with `kalm_jax.mteb.KaLMJaxReranker` on each task: ``local:<dataset>`` builds the task from a
BEIR folder under data_dir with its first stage as the candidates (`kalm_jax.mteb.local_task`); another name is an
MTEB task whose data is already in the Hugging Face cache (the Hub is not contacted: HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE default to 1). MTEB writes its result files under OUT/results/. See docs/evaluation.md, "MTEB".
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kalm_jax import cli

LOCAL_PREFIX = "local:"


class MtebTaskError(ValueError):
    """A task that cannot be built or loaded offline (the message names it and what to do)."""


def _tasks(config) -> list:
    names = [t.strip() for t in str(config.tasks).split(",") if t.strip()]
    if not names:
        raise cli.ConfigError("config.tasks is empty: name 'local:<dataset>' folders under data_dir or MTEB tasks")
    tasks = []
    for name in names:
        if name.startswith(LOCAL_PREFIX):
            if not config.data_dir:
                raise cli.ConfigError(f"task {name!r}: config.data_dir is required for local tasks")
            from kalm_jax.mteb.tasks import local_task

            tasks.append(
                local_task(
                    config.data_dir,
                    name[len(LOCAL_PREFIX) :],
                    config.split,
                    config.first_stage,
                    config.top_k,
                    max_queries=config.max_queries,
                )
            )
            continue
        import mteb

        try:
            task = mteb.get_task(name)
        except (KeyError, ValueError) as e:
            raise MtebTaskError(
                f"task {name!r}: not an MTEB task ({e}); local BEIR folders are 'local:<dataset>'"
            ) from None
        try:
            task.load_data()
        except Exception as e:  # noqa: BLE001 - any loading failure means the data is not available offline
            raise MtebTaskError(
                f"task {name!r}: its data is not available offline ({type(e).__name__}: "
                f"{str(e)[:300]}); fetch it once with network access, or use a local BEIR folder "
                "(local:<dataset>)"
            ) from e
        tasks.append(task)
    return tasks


def offline() -> None:
    """No Hub access: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE default to 1 (a value the user set wins). huggingface_hub
    and datasets read them when imported, so modules already imported in this process are told as well."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if os.environ["HF_HUB_OFFLINE"].strip().upper() not in ("1", "ON", "YES", "TRUE"):
        return
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        if module in sys.modules:
            for name in names:
                setattr(sys.modules[module], name, True)


def run(config) -> int:
    """Evaluates `config.checkpoint` on `config.tasks` with MTEB (the CLI's body, after parsing)."""
    if not config.checkpoint:
        raise cli.ConfigError("config.checkpoint is required")
    if not config.output_dir:
        raise cli.ConfigError("config.output_dir is required (MTEB's result files go there)")
    if not Path(config.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {config.checkpoint} does not exist")
    if config.overwrite not in ("only-missing", "always", "never"):
        raise cli.ConfigError(f"config.overwrite must be only-missing, always or never, got {config.overwrite!r}")
    offline()
    cli.setup_logging()
    import mteb

    from kalm_jax.mteb.adapter import KaLMJaxReranker

    tasks = _tasks(config)
    model = KaLMJaxReranker(
        config.checkpoint,
        ratio=config.ratio,
        encode_ratio=config.encode_ratio or None,
        max_query_tokens=config.max_query_tokens,
        max_document_tokens=config.max_document_tokens,
        batch_size=config.batch_size,
        score_batch_size=config.score_batch_size,
        instruction=config.instruction or None,
        system=config.system or None,
        dtype=config.dtype or None,
        tokenizer=config.tokenizer or None,
        store_dir=config.store_dir or None,
        storage=config.storage or None,
        name=config.name or None,
        show_progress=config.progress,
    )
    out = Path(config.output_dir)
    result = mteb.evaluate(
        model,
        tasks,
        cache=mteb.ResultCache(out),
        overwrite_strategy=config.overwrite,
        prediction_folder=out / "predictions" if config.save_predictions else None,
        show_progress_bar=config.progress,
    )
    for tr in result.task_results:
        print(f"{tr.task_name}\t{tr.get_score():.5f}")
    print(
        f"MTEB results in {out / 'results'}; pairs {model.stats['pairs']}, distinct documents "
        f"{model.stats['distinct_documents']}, encoded {model.stats['encoded_documents']}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli.run(run, "mteb.py", argv=argv, errors=user_errors)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors reported in one line."""
    from kalm_jax.data.textfile import DataError
    from kalm_jax.evaluation.store import StaleStoreError, StoreLocked
    from kalm_jax.mteb.adapter import NonFiniteScoreError

    return (MtebTaskError, FileNotFoundError, DataError, StaleStoreError, StoreLocked, NonFiniteScoreError)


if __name__ == "__main__":
    sys.exit(main())
