"""Every example workflow uses existing nodes, matching link types and valid widget values.

UI-format files (``example_workflows/*.json``) are what ComfyUI's template browser
loads; API-format files (``example_workflows/api/*.json``) are what ``POST /prompt``
takes. Core nodes are checked against ComfyUI 0.3.64's ``/object_info`` snapshot.
"""

import json
from pathlib import Path

import pytest

from tests import workflow_check as wc

ROOT = Path(__file__).resolve().parents[1] / "example_workflows"
UI_FILES = sorted(ROOT.glob("*.json"))
API_FILES = sorted((ROOT / "api").glob("*.json"))
E2E_FILES = sorted((ROOT.parent / "tools" / "e2e").glob("*.json"))  # tools/comfyui_e2e.py's extra checks


@pytest.fixture(scope="module")
def info():
    return wc.load_object_info()


def test_there_are_examples():
    assert UI_FILES and API_FILES


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_valid(path, info):
    wf = json.loads(path.read_text())
    assert wc.check_ui_workflow(wf, info) == []
    # and it converts to a valid API prompt, as the frontend would send it
    assert wc.check_api_workflow(wc.api_from_ui(wf, info), info) == []


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_has_thumbnail(path):
    assert path.with_suffix(".jpg").is_file(), f"{path.name} needs a .jpg thumbnail for the template browser"


@pytest.mark.parametrize("path", API_FILES + E2E_FILES, ids=lambda p: p.name)
def test_api_workflow_valid(path, info):
    assert wc.check_api_workflow(json.loads(path.read_text()), info) == []


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_has_ui_twin(path):
    assert (ROOT / path.name).is_file(), "each API workflow has a UI-format twin of the same name"


# -- the checker itself must catch mistakes (a check that cannot fail is no check)

def _ui():
    return json.loads((ROOT / "avsync_load_audio.json").read_text())


def test_checker_catches_unknown_node(info):
    wf = _ui()
    wf["nodes"][0]["type"] = "AVSyncNoSuchNode"
    assert any("unknown node type" in p for p in wc.check_ui_workflow(wf, info))


def test_checker_catches_type_mismatch(info):
    wf = _ui()
    wf["links"][0] = [1, 1, 1, 2, 0, "AVSYNC_TIMELINE"]  # timeline into PreviewAudio.audio
    wf["nodes"][0]["outputs"][1]["links"] = [1]
    assert any("cannot" in p or "->" in p for p in wc.check_ui_workflow(wf, info))


def test_checker_catches_bad_widget_values(info):
    wf = _ui()
    wf["nodes"][0]["widgets_values"][4] = "surround"   # channels not in list
    wf["nodes"][0]["widgets_values"][5] = -3.0         # fps below min
    problems = wc.check_ui_workflow(wf, info)
    assert any("channels" in p for p in problems) and any("fps" in p for p in problems)
    wf = _ui()
    wf["nodes"][0]["widgets_values"] = wf["nodes"][0]["widgets_values"][:3]
    assert any("no value for" in p for p in wc.check_ui_workflow(wf, info))


def test_checker_catches_api_mistakes(info):
    api = json.loads((ROOT / "api" / "avsync_load_audio.json").read_text())
    api["2"]["inputs"]["audio"] = ["1", 1]
    api["1"]["inputs"]["sample_rate"] = 1.5
    del api["1"]["inputs"]["fps"]
    problems = wc.check_api_workflow(api, info)
    assert any("AVSYNC_TIMELINE cannot feed AUDIO" in p for p in problems)
    assert any("sample_rate" in p for p in problems)
    assert any("'fps' missing" in p for p in problems)
