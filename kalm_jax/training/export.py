"""Export a trained model: LoRA merged into the base weights, written as a kalm-jax model checkpoint.

CLI: ``python -m kalm_jax.training.export --from WORKDIR_OR_STEP --out DIR [--keep_lora]``
(HF safetensors export of the result: `kalm_jax.hf` / the convert tool.) The run's tokenizer (tokenizer.model
or tokenizer.json) is copied next to the exported checkpoint when it is found.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kalm_jax import checkpointing, loader


def export(source: str | Path, out_dir: str | Path, *, merge_lora: bool = True, overwrite: bool = False) -> Path:
    """Loads `source` (training workdir, step dir, model checkpoint or HF dir), merges LoRA, saves to `out_dir`."""
    _, model = checkpointing.load_any(source)
    if merge_lora and model.has_lora:
        model.merge_lora()
    out = checkpointing.save_model(model, out_dir, overwrite=overwrite)
    try:
        loader.copy_tokenizer(loader.find_tokenizer(source), out)
    except FileNotFoundError:
        pass  # a checkpoint without a tokenizer exports without one; pass it when loading
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", required=True, help="training workdir, step dir or model checkpoint")
    p.add_argument("--out", required=True, help="output model checkpoint directory")
    p.add_argument("--keep_lora", action="store_true", help="keep the adapters separate (no merge)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    print(export(args.source, args.out, merge_lora=not args.keep_lora, overwrite=args.overwrite))


if __name__ == "__main__":
    main()
