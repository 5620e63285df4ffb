"""Sampling loops and guidance: multi-condition CFG, Audio Sync Guidance,
dual-directional EDM sampling, re-noising, frame windows."""
