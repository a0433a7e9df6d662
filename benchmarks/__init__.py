"""Benchmarks: ``.venv/bin/python -m benchmarks.NAME [--quick]``, each printing a table.

Timings compare A against B in the same run, interleaved, and report medians and
median ratios; nothing here asserts on a time. ``--quick`` runs tiny sizes for CI.
"""
