"""`python -m kalm_jax.mteb`: the MTEB CLI (`kalm_jax.cli.mteb`)."""

import sys

from kalm_jax.cli.mteb import main

if __name__ == "__main__":
    sys.exit(main())
