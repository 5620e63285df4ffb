"""The pack's web extensions: ComfyUI serves WEB_DIRECTORY, the JS uses only the frontend's public
extension API, and it (and the browser check) is valid ES module syntax (checked with node when it
is installed; the live browser check, tools/browser_check.mjs, is in the README)."""

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


def test_web_extensions_use_only_the_public_frontend_api():
    # Frontend 1.58 warns that scripts/widgets.js is internal ("future updates may break this
    # import") and that widget.inputEl is deprecated; the report uses node.addDOMWidget, which
    # both renderers (LiteGraph canvas, Vue "Nodes 2.0") draw. tools/browser_check.mjs checks it live.
    for js in sorted(_web_dir().rglob("*.js")):
        text = js.read_text()
        imports = [line for line in text.splitlines() if line.startswith("import ")]
        assert all(("scripts/app.js" in line) or ("scripts/api.js" in line) for line in imports), (js.name, imports)
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
        assert "inputEl" not in code, js.name
    report = (_web_dir() / "avsync_sync_report.js").read_text()
    assert "AVSyncSyncScore:" in report and "addDOMWidget" in report and "serialize: false" in report


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("js", sorted((ROOT / "web").rglob("*.js")) + sorted((ROOT / "tools").glob("*.mjs")),
                         ids=lambda p: p.name)
def test_js_is_valid_module_syntax(js):
    res = subprocess.run(["node", "--input-type=module", "--check"], input=js.read_text(), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
