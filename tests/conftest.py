import os
import random

import numpy as np
import pytest

os.environ.setdefault("AVSYNC_DEVICE", "cpu")


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
