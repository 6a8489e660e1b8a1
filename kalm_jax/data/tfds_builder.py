"""TFDS dataset builder: reranker training JSONL -> array_record, read back with `tfds.data_source`.

Runs in TFDS's TensorFlow-free mode (no ``tensorflow`` import). Examples are stored as text (the query,
every positive and negative passage, optional teacher scores and per-example prompt); tokenization
happens in the input pipeline, so one prepared dataset serves any tokenizer, template or length.

Each builder config is one named dataset (``name``) under ``data_dir/kalm_reranker_training/<name>/1.0.0``.
The sha256 of the input files is recorded in the dataset metadata; preparing the same name again from
different files raises instead of silently reusing stale data.

CLI (settings in configs/tfds_builder.py): ``kalm-tfds-build --config.train=a.jsonl,b.jsonl.gz
--config.data_dir=DIR --config.name=scifact``
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from kalm_jax.data.textfile import OnError, SkipCounter
from kalm_jax.data.training_jsonl import iter_training_jsonl

log = logging.getLogger(__name__)

BUILDER_NAME = "kalm_reranker_training"
VERSION = "1.0.0"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _features() -> tfds.features.FeaturesDict:
    text = tfds.features.Text()
    return tfds.features.FeaturesDict(
        {
            "example_id": np.int64,
            "source": text,
            "qid": text,
            "query": text,
            "prompt": text,
            "has_prompt": np.bool_,
            "pos": tfds.features.Sequence(text),
            "neg": tfds.features.Sequence(text),
            "pos_scores": tfds.features.Sequence(np.float32),
            "neg_scores": tfds.features.Sequence(np.float32),
            "has_scores": np.bool_,
        }
    )


class KalmRerankerTraining(tfds.core.GeneratorBasedBuilder):
    """Reranker training groups (FlagEmbedding JSONL) as array_record, one builder config per dataset name."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Query, positives, negatives, optional teacher scores and prompt, as text."}
    # Nothing is downloaded; skip TFDS's lookup of a checksums file beside the code, which needs the
    # `importlib_resources` backport for package modules.
    url_infos = None

    def __init__(
        self,
        *,
        name: str = "default",
        split_files: Mapping[str, Sequence[str | Path]] | None = None,
        on_error: OnError = "raise",
        **kwargs,
    ):
        self._split_files = {k: [Path(p) for p in v] for k, v in (split_files or {}).items()}
        self._on_error = on_error
        self.skipped = SkipCounter()
        kwargs.setdefault("file_format", "array_record")
        config = tfds.core.BuilderConfig(
            name=name, version=VERSION, release_notes={}, description=f"training data {name!r}"
        )
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="KaLM reranker training examples prepared from FlagEmbedding-format JSONL.",
            features=_features(),
            metadata=tfds.core.MetadataDict(),
        )

    def input_fingerprint(self) -> dict[str, list[list[str]]]:
        """Split -> [[file name, sha256], ...] of the input files."""
        return {split: [[p.name, _sha256(p)] for p in files] for split, files in sorted(self._split_files.items())}

    def _split_generators(self, dl_manager):
        if not self._split_files:
            raise ValueError("no input files: pass split_files={'train': [...jsonl]}")
        for files in self._split_files.values():
            for p in files:
                if not p.is_file():
                    raise FileNotFoundError(f"{p}: no such training JSONL file")
        self.info.metadata["inputs"] = self.input_fingerprint()
        return {split: self._generate_examples(files) for split, files in self._split_files.items()}

    def _generate_examples(self, files: Sequence[Path]):
        example_id = 0
        for file_index, path in enumerate(files):
            for lineno, ex in iter_training_jsonl(path, self._on_error, self.skipped):
                has_scores = ex.pos_scores is not None and ex.neg_scores is not None
                yield (
                    f"{file_index}:{lineno}",
                    {
                        "example_id": example_id,
                        "source": f"{path}:{lineno}",
                        "qid": ex.qid or "",
                        "query": ex.query,
                        "prompt": ex.prompt or "",
                        "has_prompt": ex.prompt is not None,
                        "pos": ex.pos,
                        "neg": ex.neg,
                        "pos_scores": np.asarray(ex.pos_scores if has_scores else [], np.float32),
                        "neg_scores": np.asarray(ex.neg_scores if has_scores else [], np.float32),
                        "has_scores": has_scores,
                    },
                )
                example_id += 1
        if example_id == 0:
            raise ValueError(f"no valid training example in {[str(p) for p in files]}")


def prepare(
    split_files: Mapping[str, Sequence[str | Path]],
    data_dir: str | Path,
    name: str = "default",
    *,
    on_error: OnError = "raise",
    overwrite: bool = False,
) -> Path:
    """Prepares training JSONL files into array_record under `data_dir`; returns the dataset directory.

    Args:
      split_files: split name -> JSONL files (plain or gz), concatenated in order.
      data_dir: TFDS data directory.
      name: dataset (builder config) name.
      on_error: "raise" on the first invalid line (file:line in the message) or "skip" (counted, logged).
      overwrite: rebuild even if a prepared copy exists.

    Raises:
      ValueError: a prepared dataset of this name exists but was built from different input files.
    """
    builder = KalmRerankerTraining(name=name, split_files=split_files, on_error=on_error, data_dir=str(data_dir))
    dataset_dir = Path(builder.data_dir)
    if (dataset_dir / "dataset_info.json").exists() and not overwrite:
        stored = json.loads(json.dumps(builder.info.metadata.get("inputs")))
        wanted = builder.input_fingerprint()
        if stored != wanted:
            raise ValueError(
                f"{dataset_dir}: already prepared from other inputs ({stored}); "
                f"requested {wanted}; use another name or overwrite=True"
            )
        return dataset_dir
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if overwrite:
        mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if dataset_dir.exists():
            shutil.rmtree(dataset_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    if builder.skipped.total:
        log.warning(
            "%s: skipped %d invalid lines: %s", dataset_dir, builder.skipped.total, dict(builder.skipped.counts)
        )
    return dataset_dir


def data_source(data_dir: str | Path, name: str = "default", split: str = "train"):
    """Random-access source (`tfds.data_source`) over a prepared dataset split."""
    dataset_dir = Path(data_dir) / BUILDER_NAME / name / VERSION
    if not (dataset_dir / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{dataset_dir}: no prepared dataset (run kalm_jax.data.tfds_builder first)")
    builder = tfds.builder_from_directory(str(dataset_dir))
    if split not in builder.info.splits:
        raise ValueError(f"{dataset_dir}: unknown split {split!r}; available: {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def run_cli(config) -> int:
    """Prepares the splits of `config` (configs/tfds_builder.py) and prints each split's example count."""
    from kalm_jax import cli

    if not config.train:
        raise cli.ConfigError(
            "--config.train is required (kalm-tfds-build "
            "--config.train=a.jsonl,b.jsonl.gz --config.data_dir=DIR --config.name=my_mix)"
        )
    if not config.data_dir:
        raise cli.ConfigError("--config.data_dir is required (the TFDS data directory)")
    if config.on_error not in ("raise", "skip"):
        raise cli.ConfigError(f"--config.on_error must be raise or skip, got {config.on_error!r}")
    splits = {"train": [str(f) for f in config.train]}
    if config.validation:
        splits["validation"] = [str(f) for f in config.validation]
    out = prepare(splits, config.data_dir, config.name, on_error=config.on_error, overwrite=config.overwrite)
    for split in splits:
        print(f"{split}: {len(data_source(config.data_dir, config.name, split))} examples in {out}")
    return 0
