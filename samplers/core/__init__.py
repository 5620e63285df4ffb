"""One sampling core for every generator: noise sources, solvers (EDM Euler, zero-SNR DDIM),
guidance objects over condition branches, one loop, chunked decode, memory check.
See docs/sampling.md."""
