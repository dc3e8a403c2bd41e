# Benchmarks: the paper's experiments and baselines (experiments.py), the load generator
# (loadgen.py), and pytest-benchmark regression runs (test_bench_*.py, baseline/). See
# docs/benchmarks.md.
