"""Measuring a representation: probes, metrics, CRF, seeds, the eval and predict stages, their figures."""
