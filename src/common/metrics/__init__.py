"""Metrics on real images: fidelity, utility, privacy attacks and the FUP composite."""
