"""Checkpoint conversion CLI: kalm-jax Orbax checkpoints ⇄ Hugging Face `t5gemma2` safetensors.

    kalm-convert to-hf   SRC OUT [--config.dtype=bfloat16|float32] [--config.max_shard_size=5GB]
                                           [--config.tokenizer=PATH] [--config.vision_from=HF_DIR]
                                           [--config.text_only=true] [--config.overwrite=true]
    kalm-convert from-hf SRC OUT [--config.dtype=float32|bfloat16] [--config.overwrite=true]
    kalm-convert inspect PATH [--config.against=hf|orbax] [--config.hf_config=config.json]
                                            [--config.summary=true]

`to-hf` SRC: a model checkpoint (`kalm_model.json` + `params/`), a training step directory
(`<workdir>/checkpoints/<step>/`), a training workdir (latest step) or an HF directory (re-export, e.g.
to change dtype or sharding). `from-hf` writes a model checkpoint that `train.py --config.init_from=` and
`eval.py` load. `inspect` lists tensors, shapes, dtypes and parameter counts, and with `--against`
names every tensor the target format would miss, not expect, or get with the wrong shape (exit code 1).
Settings: configs/convert.py through the one config entry (`kalm_jax.cli`). The work is done by
`kalm_jax.checkpoints.hf` and `kalm_jax.checkpoints.orbax_io`; this module only maps settings onto them.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np

from kalm_jax import cli
from kalm_jax.checkpoints import hf, loader, orbax_io
from kalm_jax.model.config import ModelConfig
from kalm_jax.text.load import tokenizer_files

LORA_SUFFIXES = ("_lora_a", "_lora_b")


def refuse_overwriting_inputs(out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Raises ValueError when the output directory is an input (or holds one): writing it would replace the
    input (also through symlinks and relative paths)."""
    o = Path(out).resolve()
    for what, path in inputs.items():
        if not path:
            continue
        i = Path(path).resolve()
        if i == o or o in i.parents:
            raise ValueError(
                f"output {out} {'is' if i == o else 'contains'} the {what} {path}: writing it would "
                "destroy the input; choose another output directory"
            )


def to_hf(args) -> int:
    src = Path(args.src)
    if args.text_only and args.vision_from:
        raise ValueError(
            "text_only and vision_from contradict each other (no vision tensors vs vision "
            "tensors from a directory); pass one of them"
        )
    refuse_overwriting_inputs(
        args.out, {"source checkpoint": src, "vision_from directory": args.vision_from, "tokenizer": args.tokenizer}
    )
    model = loader.load(src, tokenizer=False).model
    if not args.text_only and not args.vision_from:
        refuse_overwriting_inputs(
            args.out,
            {
                "HF checkpoint the model was imported from (its vision tensors are carried over)": getattr(
                    model, "hf_source", None
                )
            },
        )
    tokenizer = args.tokenizer
    if tokenizer is None:
        found = tokenizer_files(*loader.tokenizer_search_dirs(src))
        tokenizer = next(iter(found.values())).parent if found else None
    out = hf.save(
        model,
        model.config,
        args.out,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_size,
        tokenizer=tokenizer,
        overwrite=args.overwrite,
        vision_from=False if args.text_only else args.vision_from,
        progress=True,
        dequantize=args.dequantize,
    )
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    return 0


def from_hf(args) -> int:
    src = Path(args.src)
    refuse_overwriting_inputs(args.out, {"source HF directory": src})
    if not orbax_io.is_hf_dir(src):
        raise ValueError(
            f"{src}: not a Hugging Face checkpoint directory (config.json + *.safetensors); from-hf "
            "converts HF directories (to-hf takes any checkpoint)"
        )
    model = loader.load(src, dtype=args.dtype, tokenizer=False).model
    extra = tokenizer_files(src)
    out = orbax_io.save_model(model, args.out, overwrite=args.overwrite, extra_files=extra)
    print(f"wrote {out} (params in {args.dtype}; tokenizer files: {sorted(extra) or 'none found'})")
    if model.hf_passthrough:
        print(
            f"note: {len(model.hf_passthrough)} vision-tower/projector tensors are not converted; `to-hf` "
            f"carries them from {src} (recorded in {orbax_io.META_FILE}) or from --vision-from"
        )
    return 0


# ---------------------------------------------------------------------- inspect
def _hf_listing(path: Path, config_path: str | None):
    """(rows [(name, shape, dtype)], config or None) of an HF directory or a single .safetensors file."""
    if path.is_file():
        header, _ = hf.read_safetensors_header(path)
        rows = [(n, tuple(e["shape"]), e["dtype"]) for n, e in header.items() if n != "__metadata__"]
        cfg_file = Path(config_path) if config_path else path.parent / "config.json"
    else:
        st = hf.SafetensorsDir(path)
        rows = []
        for n in st.names():
            dtype, shape, _ = st.raw_entry(n)
            rows.append((n, shape, dtype))
        st.close()
        cfg_file = Path(config_path) if config_path else path / "config.json"
    cfg = None
    if cfg_file.is_file():
        cfg = (
            hf.read_config(cfg_file.parent)
            if cfg_file.name == "config.json"
            else ModelConfig.from_hf(json.loads(cfg_file.read_text()), source=str(cfg_file))
        )
    return sorted(rows), cfg


def _orbax_listing(path: Path):
    """(rows [(dotted name, shape, dtype)], config) of a model checkpoint, step dir or workdir (no loading)."""
    import jax
    import orbax.checkpoint as ocp

    step = path if orbax_io.find_meta(path) is not None else orbax_io.latest_step_dir(path)
    meta_path = orbax_io.find_meta(step) if step is not None else None
    if meta_path is None:
        raise ValueError(f"{path}: not an HF directory/.safetensors file nor a kalm-jax checkpoint")
    meta = json.loads(meta_path.read_text())
    cfg = ModelConfig.from_hf(meta["config"], source=str(meta_path))
    md = ocp.StandardCheckpointer().metadata((step / "params").absolute()).item_metadata
    tree = md.tree if hasattr(md, "tree") else md
    rows = []
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(str(getattr(k, "key", k)) for k in keys)
        rows.append((name, tuple(leaf.shape), str(leaf.dtype)))
    return sorted(rows), cfg


QUANT_LEAVES = ("qvalue", "scale", "zero_point")
"""The leaves of a quantized weight in a checkpoint (`kalm_jax.model.quantization`, a `qwix.QArray`)."""


def _orbax_as_hf(rows, cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], list[str], list[str], list[str]]:
    """HF {name: shape} that `to-hf` would write from Orbax leaves; plus LoRA leaves, unknown leaves and the
    quantized weights (their values have the weight's shape; `to-hf --config.dequantize=True` writes them)."""
    known = {spec.path for spec in hf.tensor_specs(cfg)}
    by_path: dict[tuple[str, ...], tuple[int, ...]] = {}
    quantized: list[str] = []
    for n, shape, _ in rows:
        path = tuple(n.split("."))
        if path[-1] in QUANT_LEAVES and path[:-1] in known:
            if path[-1] == "qvalue":
                by_path[path[:-1]] = shape
                quantized.append(".".join(path[:-1]))
            continue
        by_path[path] = shape
    out: dict[str, tuple[int, ...]] = {}
    for path, shape in by_path.items():
        if path not in known:
            continue
        if path[0] in hf.STACKS:
            prefix = hf.STACKS[path[0]]
            suffix = {v: k for k, v in hf.LAYER_NAMES.items()}[path[-1]]
            for layer in range(shape[0]):
                out[f"{prefix}.{layer}.{suffix}"] = hf.hf_shape(path[-1], shape[1:])
        else:
            name = {v[0]: k for k, v in hf.TOP_NAMES.items()}[path[0]]
            out[name] = tuple(shape)
    lora = sorted(".".join(p) for p in by_path if p[-1].endswith(LORA_SUFFIXES))
    unknown = sorted(".".join(p) for p in by_path if p not in known and not p[-1].endswith(LORA_SUFFIXES))
    return out, lora, unknown, sorted(quantized)


def inspect(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    is_hf = (
        path.is_file()
        or (path / "config.json").is_file()
        and (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists())
    )
    rows, cfg = _hf_listing(path, args.config) if is_hf else _orbax_listing(path)
    kind = "Hugging Face safetensors" if is_hf else "kalm-jax Orbax checkpoint"
    if not args.summary:
        width = max((len(n) for n, _, _ in rows), default=4)
        print(f"{'tensor':<{width}}  {'shape':<22} {'dtype':<9} {'params':>12}")
        for name, shape, dtype in rows:
            print(f"{name:<{width}}  {str(list(shape)):<22} {dtype:<9} {int(np.prod(shape)):>12,}")
    groups: dict[str, int] = {}
    for name, shape, _ in rows:
        canon = hf.canonical_name(name)
        group = (
            "vision tower + projector"
            if canon.startswith(hf.PASSTHROUGH_PREFIXES)
            else "LoRA factors"
            if name.endswith(LORA_SUFFIXES)
            else "quantization scales"
            if name.endswith((".scale", ".zero_point"))
            else "text"
        )
        groups[group] = groups.get(group, 0) + int(np.prod(shape))
    dtypes = sorted({d for _, _, d in rows})
    print(f"\n{path}: {kind}, {len(rows)} tensors, dtypes {dtypes}")
    for group, n in groups.items():
        print(f"  {group:<26} {n:>15,} parameters")
    print(f"  {'total':<26} {sum(groups.values()):>15,} parameters")
    if cfg is not None:
        print(
            f"  config: hidden {cfg.hidden_size}, {cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, "
            f"vocab {cfg.vocab_size}; text parameters expected: {cfg.param_counts()['total']:,}"
        )
    if args.against is None:
        return 0
    if cfg is None:
        raise ValueError(f"{path}: no config.json to check against; pass --config")
    if is_hf:
        problems, passthrough = hf.check_tensors(cfg, {n: s for n, s, _ in rows})
        notes = (
            [
                f"{len(passthrough)} vision/projector tensors are not converted to {args.against} "
                f"(to-hf carries them from this directory)"
            ]
            if passthrough and args.against == "orbax"
            else []
        )
    else:
        as_hf, lora, unknown, quantized = _orbax_as_hf(rows, cfg)
        problems, _ = hf.check_tensors(cfg, as_hf)
        problems += [f"unexpected parameter {n} (not part of the {args.against} layout)" for n in unknown]
        notes = [f"{len(lora)} LoRA factors are folded into their base weights on export"] if lora else []
        if quantized:
            notes.append(
                f"{len(quantized)} weights are quantized (values and scales): to-hf writes them only with "
                "--config.dequantize=True (values x scales)"
            )
    for note in notes:
        print(f"note: {note}")
    if problems:
        print(f"\n{len(problems)} problems against the {args.against} layout of this config:")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"OK: matches the {args.against} layout of its config")
    return 0


COMMANDS = {"to-hf": to_hf, "from-hf": from_hf, "inspect": inspect}
DEFAULT_DTYPE = {"to-hf": "bfloat16", "from-hf": "float32", "inspect": ""}


def run(config) -> int:
    """Runs one conversion command from its settings (configs/convert.py)."""
    if config.command not in COMMANDS:
        raise cli.ConfigError(
            f"COMMAND must be one of {sorted(COMMANDS)}, got {config.command!r} "
            "(kalm-convert to-hf|from-hf|inspect SOURCE [OUTPUT])"
        )
    if not config.source:
        raise cli.ConfigError(f"{config.command} needs SOURCE")
    if config.command != "inspect" and not config.output:
        raise cli.ConfigError(f"{config.command} needs OUTPUT")
    dtype = config.dtype or DEFAULT_DTYPE[config.command]
    if config.command != "inspect" and dtype not in ("bfloat16", "float32"):
        raise cli.ConfigError(f"--config.dtype must be bfloat16 or float32, got {config.dtype!r}")
    if config.against not in ("", "hf", "orbax"):
        raise cli.ConfigError(f"--config.against must be hf or orbax, got {config.against!r}")
    args = types.SimpleNamespace(
        src=config.source,
        out=config.output,
        path=config.source,
        dtype=dtype,
        max_shard_size=config.max_shard_size,
        tokenizer=config.tokenizer or None,
        vision_from=config.vision_from or None,
        text_only=config.text_only,
        overwrite=config.overwrite,
        against=config.against or None,
        config=config.hf_config or None,
        summary=config.summary,
        dequantize=config.dequantize,
    )
    return COMMANDS[config.command](args)
