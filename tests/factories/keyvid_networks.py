"""Portable pseudo-random tensors for the KeyVID network parity fixtures.

The released UNet hard-codes a 1024-wide context and a 768→1024 audio projection, so
even a tiny UNet has ~2.5 M parameters — too many to commit as fixture weights. The
fixtures therefore store only the reference *outputs* plus a sha256 of the weights and
inputs, and both sides regenerate weights and inputs with :func:`portable_uniform`: a
counter-based integer hash (pure int64 arithmetic, then one float64 division and a cast
to float32), so every platform, CPU capability and torch version produces the same bits.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import pytest
import torch

_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32"-style integer finaliser; every product stays below 2**59 (no int64 overflow)
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK
    return (x >> 16) ^ x


def _seed_of(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


def portable_uniform(shape, name: str, seed: int = 0, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Uniform ``[low, high)`` float32 tensor determined only by ``(shape, name, seed)``."""
    n = 1
    for s in shape:
        n *= int(s)
    i = torch.arange(n, dtype=torch.int64)
    x = _mix((i * 2654435761 + _seed_of(name, seed)) & _MASK)
    x = _mix(x ^ 0x9E3779B9)
    u = (x.to(torch.float64) + 0.5) / 2.0 ** 32
    return (low + (high - low) * u).to(torch.float32).reshape(tuple(shape))


def random_weights(state: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` re-randomised (nothing left at its zero init): matrices
    and conv kernels uniform with unit-variance fan-in scaling, norm weights around 1,
    biases and scalars (``beta``) small but non-zero."""
    out = {}
    for k, v in state.items():
        if v.dim() >= 2:
            a = (3.0 / max(1, v[0].numel())) ** 0.5
            t = portable_uniform(v.shape, k, seed, -a, a)
        elif k.endswith("beta"):
            t = portable_uniform(v.shape, k, seed, -1.0, 1.0)
        elif k.endswith("weight"):   # 1-D weights are GroupNorm / LayerNorm scales
            t = portable_uniform(v.shape, k, seed, 0.7, 1.3)
        else:
            t = portable_uniform(v.shape, k, seed, -0.2, 0.2)
        out[k] = t
    return out


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 bytes (in sorted key order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to(torch.float32).contiguous()
        h.update(k.encode()); h.update(str(tuple(t.shape)).encode()); h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one intra-op thread: the tiny KeyVID networks
    are faster that way on a shared machine (no spin-waiting on oversubscribed CPUs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A small own-test UNet: context_dim 64 (the port sizes audio_proj_2 by context_dim; the release
# hard-codes 1024, which the parity fixtures keep), two levels with attention at both, 7 audio layers.
def small_unet_params() -> dict:
    from avsync.networks.keyvid_unet import GENERATOR_UNET_PARAMS
    return dict(GENERATOR_UNET_PARAMS, model_channels=32, channel_mult=[1, 2], attention_resolutions=[1, 2],
                num_head_channels=16, num_res_blocks=1, context_dim=64)


def build_small(batch: int = 3, frames: int = 4, size: int = 8, seed: int = 11):
    """``(net, weights, inputs)``: the small UNet in eval mode with portable random weights
    and a batch of inputs (keyword names as ``KeyVIDUNet.forward`` takes them)."""
    from avsync.networks.keyvid_unet import KeyVIDUNet
    net = KeyVIDUNet.from_released_params(small_unet_params()).eval()
    weights = random_weights(net.state_dict(), seed=seed)
    net.load_state_dict(weights)
    frame_idx = torch.tensor([[0, 5, 20, 47], [0, 9, 30, 44], [0, 1, 2, 3]])
    ins = {"x": portable_uniform((batch, 8, frames, size, size), "x", seed, -1.7, 1.7),
           "timesteps": torch.tensor([900, 400, 20])[:batch],
           "context": portable_uniform((batch, 77 + 16 * frames, 64), "context", seed, -1.7, 1.7),
           "c_audio": portable_uniform((batch, frames, 12, 768), "c_audio", seed, -1.7, 1.7),
           "fs": torch.full((batch,), 6),
           "frame_idx": frame_idx[:batch, :frames]}
    return net, weights, ins
