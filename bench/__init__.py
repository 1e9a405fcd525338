"""Benchmarks: scripts run as `.venv/bin/python bench/<name>.py` that print ratios against a reference run in
the same process and write bench/results/. A package, so they share helpers as `bench.<module>`."""
