"""AVSync: audio-synchronized video generation for ComfyUI.

ComfyUI imports this folder as a package from ``custom_nodes/``; pip installs it as
the package ``avsync``. Imports inside the pack are relative, because ComfyUI has a
top-level module called ``nodes`` of its own.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import compat as _compat
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

_compat.register_model_folders()

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
