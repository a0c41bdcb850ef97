"""Benchmarks a user runs to check a claim, each a script (`python bench/moe_layer.py`, `--smoke` for a
CPU check in seconds) or a module (`python -m bench.moe_layer`); bench/lab/ holds the kernel
development tools, bench/common/ what they all share, bench/baselines/ what they compare against."""
