"""The CLIs' config files (ml_collections ``get_config(arg)``), shipped inside the package.

``--config=NAME.py[:ARG]`` names one of these; a user's own file is a path (see `kalm_jax.cli`).
"""
