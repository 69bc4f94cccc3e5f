"""Benchmarks: `python benchmarks/run.py [--quick] --data DIR --out FILE.json` (see run.py).

An installed package of the project, like `pipeline` (pyproject.toml's packages.find; `make setup`
installs both), so every script runs as `python benchmarks/run.py` or `python -m benchmarks.run` does,
without touching sys.path. A script's own directory comes first on sys.path, so no module here may
share a name with a top-level module it or torch imports (tests/test_benchmarks.py checks).
"""
