"""Benchmark scripts (not part of the installed package). Run them from the repository root as modules,
``python3 -m benchmarks.bench_gpu --help``, or as files once the package is installed (``pip install -e .``),
``python3 benchmarks/bench_gpu.py --help``. Results and the commands that made them: ``RESULTS.md``."""
