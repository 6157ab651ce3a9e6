"""Experiments: the Python API behind each command (analyze, weights, probe, swap, tune, ...)."""
