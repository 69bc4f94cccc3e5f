"""Benchmarks: `python benchmarks/run.py [--quick] --data DIR --out FILE.json` (see run.py)."""
