"""Studying what low rank does to a model: LASER interventions and sweeps, weight and activation spectra, result tables."""
