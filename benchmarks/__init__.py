"""Benchmarks of training, serving, search and quality; each runs from the repository root as
`python -m benchmarks.NAME` and writes into benchmarks/results/ (benchmarks/common.py holds what
they share)."""
