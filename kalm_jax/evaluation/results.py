"""The sweep's results file: ``OUT/results.jsonl`` (one JSON row per finished cell) and
``OUT/sweep_config.json`` (the settings the rows depend on)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kalm_jax.evaluation.settings import Settings, SweepConfigError

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
CONFIG_FILE = "sweep_config.json"


def cell_key(row: Mapping[str, Any]) -> tuple:
    return (row["dataset"], row["split"], row["stage"], row.get("checkpoint"), row.get("ratio"), row.get("instruction"))


def read_results(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of OUT/results.jsonl; a torn last line (a crash while appending) is ignored with a warning."""
    path = Path(output_dir) / RESULTS
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                log.warning("%s:%d: ignoring a torn last line (interrupted write); the cell will be redone", path, i)
                continue
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
    return rows


def append(output_dir: Path, row: Mapping[str, Any]) -> None:
    path = output_dir / RESULTS
    with open(path, "a+b") as f:
        f.seek(0)
        data = f.read()
        if data and not data.endswith(b"\n"):  # a torn, unparseable last line from a kill: drop it
            f.truncate(data.rfind(b"\n") + 1)
            log.warning("%s: removed a torn last line left by an interrupted write", path)
        f.write((json.dumps(row, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def check_output_dir(settings: Settings) -> None:
    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    ident = settings.identity()
    if path.is_file():
        stored = json.loads(path.read_text()).get("identity", {})
        diff = {k: (stored.get(k), v) for k, v in ident.items() if stored.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: results used {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise SweepConfigError(f"{out} holds results of a different configuration ({details}); "
                                   "use a new output_dir (finished results are never overwritten)")
    elif (out / RESULTS).exists():
        raise SweepConfigError(f"{out} has {RESULTS} but no {CONFIG_FILE}: cannot tell which settings produced "
                               "it; use a new output_dir")
    else:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"identity": ident}, indent=1, sort_keys=True))
        os.replace(tmp, path)


__all__ = ["RESULTS", "CONFIG_FILE", "cell_key", "read_results", "append", "check_output_dir"]
