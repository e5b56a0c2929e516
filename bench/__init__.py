"""Benchmarks of the bot against its baselines: `python -m bench` (see bench/run.py)."""
