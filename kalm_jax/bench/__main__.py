"""`python -m kalm_jax.bench --shapes=tiny,nano --out=FILE.json`: benchmark tables + a JSON list of rows.

Rows: kind in {encode, score, online_ratio, peer, train}, with shape, n, r where they apply and the
measured figures. Runs on whatever backend JAX has; the PyTorch peer runs when torch + CUDA exist (or
with --peer_on_cpu). See docs/performance.md for the row fields and the FLOP model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kalm_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=_names, default=("nano", "small", "large"),
                   help="model presets (tiny, nano, small, large); random weights")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the rows (rewritten after every row)")
    p.add_argument("--encode_lengths", type=_ints, default=(256, 512, 1024, 4096), help="passage lengths n for encode rows")
    p.add_argument("--score_lengths", type=_ints, default=(256, 512, 4096), help="passage lengths n for score rows")
    p.add_argument("--ratios", type=_ints, default=(1, 2, 4, 8, 16, 32), help="MEP ratios r for score rows")
    p.add_argument("--candidates", type=int, default=100, help="candidates scored per query")
    p.add_argument("--prompt_len", type=int, default=64,
                   help="decoder prompt tokens (default: system + instruction + a 16-token query)")
    p.add_argument("--encode_tokens", type=int, default=32768, help="passage tokens per encode call")
    p.add_argument("--score_batch", type=int, default=100, help="pairs per score call (halved on OOM)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "dot_product", "cudnn"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (the median is reported)")
    p.add_argument("--rotations", type=int, default=3, help="distinct input sets cycled through")
    p.add_argument("--peak_sizes", type=_ints, default=None, help="square matmul sizes for the peak measurement")
    p.add_argument("--seed", type=int, default=0)
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--peer", dest="peer", action="store_true", default=None,
                      help="run the PyTorch peer (default: when torch and CUDA are available)")
    peer.add_argument("--nopeer", dest="peer", action="store_false", help="skip the PyTorch peer")
    p.add_argument("--peer_on_cpu", action="store_true", help="run the peer on CPU when there is no CUDA")
    p.add_argument("--notrain", dest="train", action="store_false", help="skip train-step rows")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables as markdown here")
    p.add_argument("--suite", default="grid", choices=("grid", "h100", "side_by_side"),
                   help="grid: the flags above; h100: the fixed H100 grid (kalm_jax.bench.suite.H100; flags given "
                        "explicitly override it; writes bench_h100.json + bench_h100.md unless --out/--markdown); "
                        "side_by_side: kalm-jax vs the PyTorch peer on CPU, same weights, interleaved rounds "
                        "(first --shapes entry, first --score_lengths entry as n, first --ratios entry as r)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --suite=side_by_side")
    args = p.parse_args(argv)
    args.explicit = {k for k, v in vars(args).items() if v != p.get_default(k)}
    for name in ("candidates", "prompt_len", "encode_tokens", "score_batch", "repeats", "rotations"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Let PyTorch (the peer runs first) and JAX share the device: JAX allocates on demand.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    from tqdm import tqdm

    from kalm_jax.bench import report, runner, suite
    from kalm_jax.config import PRESETS

    unknown = [s for s in args.shapes if s not in PRESETS]
    if unknown:
        print(f"error: unknown shapes {unknown}; valid: {sorted(PRESETS)}", file=sys.stderr)
        return 2
    if args.suite == "side_by_side":
        return _side_by_side(args)
    settings = suite.BenchSettings(
        shapes=args.shapes, encode_lengths=args.encode_lengths, score_lengths=args.score_lengths,
        ratios=args.ratios, candidates=args.candidates, prompt_len=args.prompt_len,
        encode_tokens=args.encode_tokens, score_batch=args.score_batch, dtype=args.dtype,
        attention_impl=args.attention_impl, warmup=args.warmup, repeats=args.repeats,
        rotations=args.rotations, seed=args.seed, train=args.train)
    if args.suite == "h100":
        settings = suite_settings(suite.SUITES["h100"], settings, args.explicit)
        args.out = args.out or Path("bench_h100.json")
        args.markdown = args.markdown or Path("bench_h100.md")
    bar = tqdm(desc="bench", unit="row", file=sys.stderr)
    rows = runner.run(settings, peer=args.peer, peer_on_cpu=args.peer_on_cpu, out=args.out,
                      peak_sizes=args.peak_sizes, progress=bar.set_postfix_str, on_row=lambda _: bar.update())
    bar.close()
    report.print_tables(rows)
    if args.markdown:
        args.markdown.write_text(report.markdown(rows))
    if args.out:
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


def suite_settings(fixed, flags, explicit: set[str]):
    """A fixed suite's settings with the fields whose flags were given explicitly taken from `flags`."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(fixed)}
    return dataclasses.replace(fixed, **{k: getattr(flags, k) for k in explicit & names})


def _side_by_side(args) -> int:
    from kalm_jax.bench import report, runner, side_by_side

    rows = side_by_side.run(args.shapes[0], n=args.score_lengths[0], r=args.ratios[0], candidates=args.candidates,
                            prompt_len=args.prompt_len, dtype=args.dtype, rounds=args.rounds, repeats=args.repeats,
                            warmup=args.warmup, seed=args.seed, progress=lambda m: print(m, file=sys.stderr))
    report.print_tables(rows)
    if args.out:
        runner.write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows to {args.out}")
    if args.markdown:
        args.markdown.write_text(report.markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
