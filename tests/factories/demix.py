"""Demix test material: mixtures with known stems, and tiny random MRX models saved
the way the released checkpoints are (a plain ``torch.save`` of the state dict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import audio as A

EVENT_TIMES = (0.37, 1.1, 1.9, 2.6, 3.3, 4.05, 4.8, 5.5)


def known_mixture(sr: int = 16000, duration: float = 6.0, times=EVENT_TIMES, seed: int = 0,
                  stereo: bool = False, effects_amp: float = 0.35) -> dict:
    """``{"speech", "effects", "music"}`` stems ``[C, T]`` (float32 tensors) and their sum
    ``"mixture"``: a sustained chord (music), a speech-like formant signal (speech)
    and noise-burst impacts at ``times`` (effects). With ``stereo``, speech and the
    impacts are centre-panned and the chord is spread wide (as film mixes do)."""
    music = A.chord(duration=duration, sr=sr, amp=0.3)
    speech = A.speech_like(duration=duration, sr=sr, amp=0.4, seed=seed)
    fx = A.clicks(times, duration=duration, sr=sr, amp=effects_amp, seed=seed + 1)
    if stereo:
        wide = A.chord(freqs=(246.94, 311.13, 369.99), duration=duration, sr=sr, amp=0.3)
        stems = {"speech": np.stack([speech, speech]), "effects": np.stack([fx, fx]),
                 "music": np.stack([music, 0.6 * wide])}
    else:
        stems = {"speech": speech[None], "effects": fx[None], "music": music[None]}
    out = {k: torch.tensor(v, dtype=torch.float32) for k, v in stems.items()}
    out["mixture"] = out["speech"] + out["effects"] + out["music"]
    out["times"] = list(times)
    out["sample_rate"] = sr
    return out


TINY_MRX = dict(n_sources=3, window_lengths=[128, 256], n_hop=32, n_hidden=16, n_lstm_layers=2)


def tiny_mrx_state_dict(seed: int = 0, **overrides) -> dict:
    """Random weights (and BatchNorm statistics) for a tiny MRX, in the released key layout."""
    from avsync.networks.mrx import MRX, MRXConfig

    cfg = MRXConfig(**{**TINY_MRX, **overrides})
    net = MRX(cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) * 0.5 + 0.75
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000)
        elif k.endswith("running_mean"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.3 + (1.0 if v.dim() == 1 and "weight" in k else 0.0)
    return sd


def save_tiny_mrx_pth(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny MRX ``.pth`` in the released on-disk format (plain pickled state dict)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_mrx_state_dict(seed, **overrides), path)
    return path


FAST_MRX = dict(window_lengths=[256, 512], n_hop=128)  # few frames per second: quick node-level runs


def install_tiny_mrx(models_dir: Path, name: str = "mrx_default.safetensors", seed: int = 0, **overrides) -> Path:
    """Convert a tiny MRX (default: :data:`FAST_MRX`) into the avsync_demix folder of
    ``models_dir``, as a user would with ``avsync convert demix``."""
    from avsync.loaders.demix import convert_checkpoint

    overrides = {**FAST_MRX, **overrides}
    src = save_tiny_mrx_pth(Path(models_dir) / "tmp_src" / "tiny.pth", seed, **overrides)
    return convert_checkpoint(src, Path(models_dir) / "avsync" / "demix" / name, hop=overrides.get("n_hop", 256))
