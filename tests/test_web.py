"""The pack's web extension: ComfyUI serves WEB_DIRECTORY, and the JS is valid ES module
syntax (checked with node when it is installed; the browser check is in the README)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _web_dir() -> Path:
    import ast

    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "WEB_DIRECTORY" for t in node.targets):
            return ROOT / node.value.value
    raise AssertionError("__init__.py defines no WEB_DIRECTORY")


def test_web_directory_has_the_upload_extension():
    web = _web_dir()
    js = web / "avsync_audio_upload.js"
    assert js.is_file()
    text = js.read_text()
    # it targets our node and widget by their saved names, and never serializes the button
    assert '"AVSyncAudioLoader"' in text and '"audio_file"' in text and "serialize: false" in text


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("js", sorted((ROOT / "web").rglob("*.js")), ids=lambda p: p.name)
def test_js_is_valid_module_syntax(js):
    res = subprocess.run(["node", "--input-type=module", "--check"], input=js.read_text(), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
