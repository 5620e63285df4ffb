"""Test factories: synthetic audio with known structure, and tiny random-weight
models saved in the real on-disk formats (one module per model family)."""
