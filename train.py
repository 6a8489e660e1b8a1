"""Train a KaLM reranker: `python train.py --config=train.py:tiny --workdir=DIR [--config.KEY=VALUE ...]`.

A thin shim over `kalm_jax.cli.train` (installed as the `kalm-train` command); see docs/training.md.
"""

import sys

from kalm_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
