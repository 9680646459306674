"""Measurements a fine-tuner does not need: sweep, lr grid, race, bench, sensitivity, report, plots, demo."""
