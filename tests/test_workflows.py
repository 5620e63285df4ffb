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
# loader nodes whose widget names a file in ComfyUI's input folder: the examples ship those files
INPUT_FILE_WIDGETS = {"LoadVideo": "file", "LoadImage": "image", "LoadAudio": "audio", "AVSyncAudioLoader": "audio_file"}


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


def _missing_inputs(api: dict) -> list[str]:
    """Input files an API prompt's loader nodes name that example_workflows/ does not ship."""
    return [f"node {nid} {node['class_type']}.{INPUT_FILE_WIDGETS[node['class_type']]}: "
            f"{node['inputs'].get(INPUT_FILE_WIDGETS[node['class_type']])!r} is not in example_workflows/"
            for nid, node in api.items() if node.get("class_type") in INPUT_FILE_WIDGETS
            and not (ROOT / str(node["inputs"].get(INPUT_FILE_WIDGETS[node["class_type"]]))).is_file()]


@pytest.mark.parametrize("path", UI_FILES + API_FILES + E2E_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_workflow_inputs_ship_with_the_examples(path, info):
    """Every file a workflow loads (video, image, audio) is in example_workflows/, so each
    example runs as it is once those files are copied into ComfyUI/input/ (README)."""
    wf = json.loads(path.read_text())
    api = wc.api_from_ui(wf, info) if "nodes" in wf else wf
    assert _missing_inputs(api) == []


def test_missing_input_check_can_fail():
    api = json.loads((ROOT / "api" / "avsync_sync_score.json").read_text())
    api["1"]["inputs"]["file"] = "not_shipped.mp4"
    assert _missing_inputs(api) == ["node 1 LoadVideo.file: 'not_shipped.mp4' is not in example_workflows/"]


def test_sync_score_example_on_its_shipped_clip():
    """example_workflows/avsync_sync_score.json on the clip it loads, with its widget values:
    frames, fps and audio read as `avsync score` reads a file (PyAV), then the node. The clip
    is the real recording of tests/data/sync/README.md (talking and typing): low AV-Align and
    an offset of about +434 ms (README: +434 ms at flow_max_side=256; +433 ms measured here
    at full resolution), which the workflow's note tells users to expect."""
    import torch

    from avsync.cli.cmd_score import decode_video_frames
    from avsync.cli.common import load_audio_file, run_node

    api = json.loads((ROOT / "api" / "avsync_sync_score.json").read_text())
    clip = ROOT / api["1"]["inputs"]["file"]
    frames, fps = decode_video_frames(clip, 60)
    audio, _ = load_audio_file(clip, fps=float(fps), duration=len(frames) / float(fps))
    widgets = {k: v for k, v in api["3"]["inputs"].items() if not isinstance(v, list)}
    assert widgets["flow_max_side"] == 0  # the published full-resolution flow
    report, av_align, offset_ms, confidence, *_, plot = run_node(
        "AVSyncSyncScore", images=torch.from_numpy(frames).float() / 255.0, audio=audio, fps=fps, **widgets)
    assert (report.num_frames, report.fps) == (208, 25.0) and plot.shape == (1, 512, 1024, 3)
    assert abs(offset_ms - 434.0) <= 1000 / 25 and confidence > 1.2  # within one frame of the README's
    assert 0.03 < av_align < 0.2 and len(report.audio_onset_times) > 20 and len(report.motion_peak_frames) > 10


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
