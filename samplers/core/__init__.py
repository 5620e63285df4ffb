"""One sampling core for every generator: noise sources, solvers (EDM Euler, zero-SNR DDIM, MTV's SDE
DPM++(2M) with the clean-frame hand-over), guidance objects over condition branches, one loop, chunked
decode, memory check. See docs/sampling.md."""
