"""Benchmarks, run from a checkout: ``python -m benchmarks.speed`` and ``python -m benchmarks.load``."""
