"""Benchmarks for share_jax; run each module with ``python -m benchmarks.NAME --help``."""
