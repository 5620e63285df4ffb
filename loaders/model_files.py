"""The model files AVSync knows: where each lives, where it comes from, how to check it.

Every loader resolves its file through :func:`resolve`, so a missing file always
gets the same kind of error: the file, the folder searched and where to get it.
``avsync info`` and the README's model table are made from :data:`MODEL_FILES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import compat
from ..core.errors import MissingModelError


@dataclass(frozen=True)
class ModelFileSpec:
    key: str                 # short id used in code and on the command line
    filename: str            # the name AVSync expects (users may rename; loaders list the folder)
    folder: str              # ComfyUI model folder name (AVSync's own or a core one)
    source: str              # where to get it (URL and, if needed, the `avsync convert` step)
    description: str
    sha256: Optional[str] = None   # of the file as AVSync reads it (after conversion), when known
    size: Optional[str] = None     # human-readable size
    is_dir: bool = False           # a diffusers-format folder rather than one file


MODEL_FILES: dict[str, ModelFileSpec] = {}


def register(spec: ModelFileSpec) -> ModelFileSpec:
    MODEL_FILES[spec.key] = spec
    return spec


def resolve(key_or_spec, filename: Optional[str] = None) -> Path:
    """The path of a model file, or a :class:`MissingModelError` naming file, folder and source."""
    spec = MODEL_FILES[key_or_spec] if isinstance(key_or_spec, str) else key_or_spec
    name = filename or spec.filename
    path = compat.find_model_file(spec.folder, name)
    if path is None:
        raise MissingModelError(name, spec.folder, compat.model_folder_paths(spec.folder), spec.source)
    return path


def file_choices(specs, extensions=compat.MODEL_EXTENSIONS) -> list[str]:
    """The choices of a loader node's file combo: the expected file names first (always
    listed, so a shared workflow that names one validates and, when the file is missing,
    fails with where to get it), then every other file found in their folders."""
    specs = [specs] if isinstance(specs, ModelFileSpec) else list(specs)
    expected = [s.filename for s in specs]
    found = []
    for folder in dict.fromkeys(s.folder for s in specs):
        found += [f for f in compat.list_model_files(folder, extensions) if f not in expected and f not in found]
    return expected + found
