"""AVSync: audio-synchronized video generation for ComfyUI.

ComfyUI imports this folder as a package from ``custom_nodes/``; pip installs it as
the package ``avsync``. Imports inside the pack are relative, because ComfyUI has a
top-level module called ``nodes`` of its own.
"""

from __future__ import annotations

__version__ = "0.1.0"

WEB_DIRECTORY = "./web/js"  # the audio loader's upload button
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

# pytest imports this file as a plain module named "__init__" (no parent package) when
# it collects the repository root; there is nothing to register then.
if __package__:
    from . import compat as _compat
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

    _compat.register_model_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
