"""Sweeps, result tables and figures: arrive with the experiments issue."""
