"""`python -m kalm_jax.serve`: the rerank server (`kalm_jax.cli.serve`)."""

import sys

from kalm_jax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
