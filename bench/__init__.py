"""Benchmarks: run as scripts (`python bench/moe_layer.py`) or modules (`python -m bench.moe_layer`)."""
