"""Benchmarks run by `./dev bench`: each measures the plugin and a bare reference side by side, in one run.

Not tests: they print a table (bench/table.py) with the ratios and whether each target is met. The host
parts (vault, standalone) run anywhere the test suite runs; the node part needs dm-crypt and runs in a
virtme-ng guest (`./dev bench --vm`).
"""
