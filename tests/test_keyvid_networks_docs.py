"""The Python API example in docs/keyvid.md runs as written (so it cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "keyvid.md"


def test_python_api_example_runs(capsys):
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    block = re.search(r"### Example\n.*?```python\n(.*?)```", section, re.S).group(1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(block, f"{DOC}:Python API example", "exec"), {"__name__": "keyvid_doc_example"})
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "keyframe 47 hears audio from frame 43" in out
    assert "torch.Size([1, 4, 12, 8, 8]) 6 audio layers" in out
