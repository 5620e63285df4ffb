"""The EDM pieces moved to :mod:`avsync.samplers.core.edm`; this path stays so existing imports keep working."""

from .core.edm import *  # noqa: F401,F403
