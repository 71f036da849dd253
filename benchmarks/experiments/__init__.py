"""Experiments on trained encoders that no shipped model uses (kept out of the `training`
package): `python -m benchmarks.experiments.NAME`."""
