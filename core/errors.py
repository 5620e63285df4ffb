"""Errors a user sees. Each message names the input (or file) and what was expected."""

from __future__ import annotations


class AVSyncError(Exception):
    """Base class of AVSync's own errors."""


class InputError(AVSyncError, ValueError):
    """A node input or command-line argument is not what the node needs.

    ``input_name`` is the socket or widget name, so the message can start with it.
    """

    def __init__(self, input_name: str, problem: str):
        self.input_name = input_name
        self.problem = problem
        super().__init__(f"{input_name}: {problem}")


class AudioFileError(AVSyncError, ValueError):
    """An audio file that cannot be used: names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class MissingModelError(AVSyncError, FileNotFoundError):
    """A model file that is not where AVSync looks for it."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, filename: str, folder: str, searched, source: str, extra: str = ""):
        self.filename = filename
        self.folder = folder
        searched = [str(s) for s in searched] or ["(no folder registered)"]
        msg = (
            f"model file '{filename}' not found in the '{folder}' model folder "
            f"(searched: {', '.join(searched)}). Get it from: {source}"
        )
        if extra:
            msg += f". {extra}"
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:  # OSError would format its constructor arguments as errno/strerror
        return self.message


class ModelFormatError(AVSyncError, ValueError):
    """A model file that exists but is not the expected format or layout."""
