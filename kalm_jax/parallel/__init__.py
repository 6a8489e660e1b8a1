"""Parallelism: the device mesh, multi-process start-up and the local launcher."""
