"""Evaluation sweeps: `python eval.py --config.checkpoint=CKPT --config.data_dir=DATA --config.output_dir=OUT ...`.

A thin shim over `kalm_jax.cli.eval` (installed as the `kalm-eval` command); see docs/evaluation.md.
"""

import sys

from kalm_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
