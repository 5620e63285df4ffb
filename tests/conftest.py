import os
import random

import numpy as np
import pytest

os.environ.setdefault("AVSYNC_DEVICE", "cpu")


def torch_torchaudio_mismatch():
    """A message naming the pair when the installed torchaudio does not belong to the installed
    torch (its major.minor must equal torch's: torchaudio 2.11.x needs torch 2.11.x), else None.
    Reads package metadata only: importing a mismatched torchaudio can crash."""
    from importlib import metadata

    try:
        ta = metadata.version("torchaudio")
    except metadata.PackageNotFoundError:
        return None
    t = metadata.version("torch")
    if ta.split("+")[0].split(".")[:2] != t.split("+")[0].split(".")[:2]:
        return (f"torchaudio {ta} does not belong to torch {t} (torchaudio {'.'.join(ta.split('.')[:2])} needs "
                f"torch {'.'.join(ta.split('.')[:2])}): install the pinned pair with "
                f"`pip install -r requirements-test.txt`, or uninstall torchaudio (AVSync does not need it; "
                f"only the torchaudio comparison tests use it)")
    return None


def pytest_configure(config):
    problem = torch_torchaudio_mismatch()
    if problem:
        pytest.exit(problem, returncode=3)


@pytest.fixture(autouse=True)
def _seed_everything():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """A fresh models directory (outside ComfyUI) for tests that save tiny models."""
    from avsync import compat

    d = tmp_path / "models"
    d.mkdir()
    compat.set_models_dir(d)
    yield d
    compat.set_models_dir(None)
