"""Tiny KeyVID localizers with random weights, saved the way the release is: a pickled
plain ``state_dict`` of ``ScoreModel_mel`` (keys ``imagebindMoodel.*``, typo included,
plus ``linear1/2/3`` and the unused ``ada_weight``/``ada_bias``), and converted."""

from __future__ import annotations

from pathlib import Path

import torch

from avsync.loaders import localizer as L
from avsync.networks.imagebind_audio import KeyframeLocalizerNet, LocalizerConfig

TINY = LocalizerConfig(embed_dim=16, num_blocks=1, num_heads=2)


def released_state(cfg: LocalizerConfig = TINY, seed: int = 0) -> dict:
    """Random weights in the released key layout (with a few tensors the localizer never uses)."""
    g = torch.Generator().manual_seed(seed)
    net = KeyframeLocalizerNet(cfg)
    ours = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in net.state_dict().items()}
    back = {new: old for old, new in L._FIXED.items()}
    state = {}
    for k, v in ours.items():
        if k in back:
            state[back[k]] = v
        else:  # trunk.blocks.{i}.{part}
            state[L.TRUNK + k[len("trunk."):]] = v
    state["ada_weight"] = torch.ones(1)
    state["ada_bias"] = torch.zeros(1)
    state[L.PREFIX + "modality_heads.audio.0.weight"] = torch.ones(cfg.embed_dim)
    state[L.PREFIX + "modality_trunks.vision.blocks.0.norm_1.weight"] = torch.ones(8)
    return state


def save_release_pth(path: Path, cfg: LocalizerConfig = TINY, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(released_state(cfg, seed), path)
    return path


def save_converted(models_dir: Path, cfg: LocalizerConfig = TINY, seed: int = 0,
                   name: str = L.SPEC.filename) -> Path:
    """A converted localizer in ``models_dir``'s avsync_localizer folder."""
    src = save_release_pth(Path(models_dir) / "_release" / "best_model_version1_with_skip.pth", cfg, seed)
    dst = Path(models_dir) / "avsync" / "localizer" / name
    L.convert_checkpoint(src, dst, num_heads=cfg.num_heads)
    return dst
