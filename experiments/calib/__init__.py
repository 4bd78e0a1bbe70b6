"""Calibration of the surrogate from the real backend: sweeps, fits, hardware profiles and the fidelity report."""
