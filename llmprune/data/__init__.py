"""Calibration and evaluation text: sources (Hub datasets, local files) and token windows."""
