"""Benchmarks with their baselines (``python -m bench.handoff``); see bench/README.md."""
