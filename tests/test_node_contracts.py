"""Every registered node is well-formed as ComfyUI reads it (V1 API)."""

import math

import pytest

from avsync.nodes import FAILED_FAMILIES, NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
KNOWN_OPTION_KEYS = {
    "default", "min", "max", "step", "round", "multiline", "tooltip", "forceInput", "lazy", "rawLink",
    "control_after_generate", "image_upload", "audio_upload", "video_upload", "socketless", "widgetType",
    "display", "placeholder", "dynamicPrompts", "label_on", "label_off", "advanced",
}
NODES = sorted(NODE_CLASS_MAPPINGS.items())


def test_all_families_imported():
    assert FAILED_FAMILIES == {}


def test_foundation_nodes_registered():
    assert "AVSyncAudioLoader" in NODE_CLASS_MAPPINGS


@pytest.mark.parametrize("node_id,cls", NODES, ids=[n for n, _ in NODES])
def test_node_contract(node_id, cls):
    assert node_id.startswith("AVSync")
    assert NODE_DISPLAY_NAME_MAPPINGS.get(node_id)
    assert isinstance(getattr(cls, "DESCRIPTION", None), str) and len(cls.DESCRIPTION) > 20
    assert cls.CATEGORY.startswith("AVSync/")
    assert callable(getattr(cls, cls.FUNCTION))
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    seen = set()
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert name not in seen, f"{name} declared twice"
            seen.add(name)
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, f"{name}: entry must be (TYPE, options)"
            t = entry[0]
            opts = entry[1] if len(entry) == 2 else {}
            assert isinstance(opts, dict)
            assert set(opts) <= KNOWN_OPTION_KEYS, f"{name}: unknown option keys {set(opts) - KNOWN_OPTION_KEYS}"
            assert isinstance(opts.get("tooltip"), str) and opts["tooltip"].strip(), f"{name}: no tooltip"
            if isinstance(t, list):
                assert all(isinstance(o, str) for o in t), f"{name}: combo options must be strings"
                if t and "default" in opts:
                    assert opts["default"] in t, f"{name}: default {opts['default']!r} not in its list"
                if not t:
                    assert section == "optional" or opts.get("image_upload") or opts.get("audio_upload"), \
                        f"{name}: a required combo with no options can never validate"
            else:
                assert isinstance(t, str) and t, f"{name}: type must be a string"
                if t in ("INT", "FLOAT"):
                    assert "default" in opts, f"{name}: numeric widget without default"
                    d = opts["default"]
                    assert isinstance(d, int if t == "INT" else (int, float)) and not isinstance(d, bool)
                    assert math.isfinite(d)
                    assert opts.get("min", -math.inf) <= d <= opts.get("max", math.inf), f"{name}: default out of range"
                    if "min" in opts and "max" in opts:
                        assert opts["min"] <= opts["max"]
                    if t == "INT":
                        for k in ("min", "max", "step"):
                            if k in opts:
                                assert isinstance(opts[k], int), f"{name}: INT {k} must be int"
                elif t == "BOOLEAN":
                    assert isinstance(opts.get("default"), bool)
                elif t == "STRING":
                    assert isinstance(opts.get("default", ""), str)
                elif t not in WIDGETS:
                    assert t.isupper(), f"{name}: socket types are upper case ({t})"
                    if t.startswith("AVSYNC") is False and t not in {"AUDIO", "IMAGE", "MASK", "LATENT", "MODEL",
                                                                       "VAE", "CLIP", "CONDITIONING", "CLIP_VISION",
                                                                       "CLIP_VISION_OUTPUT", "VIDEO", "SIGMAS",
                                                                       "AUDIO_ENCODER_OUTPUT"}:
                        pytest.fail(f"{name}: custom socket type {t} must be prefixed AVSYNC_")
    rt = cls.RETURN_TYPES
    assert isinstance(rt, tuple)
    names = getattr(cls, "RETURN_NAMES", None)
    tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
    assert names is not None and len(names) == len(rt)
    assert tips is not None and len(tips) == len(rt) and all(isinstance(x, str) and x for x in tips)
    assert "STRING" not in rt or node_id.endswith(("Info", "Report")), "no STRING where a typed object belongs"
    if not rt:
        assert getattr(cls, "OUTPUT_NODE", False), "a node with no outputs must be an output node"


@pytest.mark.parametrize("node_id,cls", NODES, ids=[n for n, _ in NODES])
def test_validate_inputs_keeps_comfyui_checks(node_id, cls):
    """ComfyUI 0.3.64 (execution.py:validate_inputs) skips its own combo / min / max check of every input
    that VALIDATE_INPUTS takes, of ALL inputs when it takes ``**kwargs``, and reports one refusal once
    per input it takes. Seen in a live ComfyUI: AVSyncMTVGenerator's ``**kw`` let seed −1 and cfg 50 run,
    and one bad storage value on AVSyncMTVLoader came back as 8 errors, one per slot. So no ``**kwargs``,
    and every widget VALIDATE_INPUTS takes must be one it checks beyond the schema (listed here)."""
    import inspect

    validate = getattr(cls, "VALIDATE_INPUTS", None)
    if validate is None:
        return
    params = inspect.signature(validate).parameters
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values()), node_id
    spec = cls.INPUT_TYPES()
    widgets = {name for section in ("required", "optional") for name, entry in spec.get(section, {}).items()
               if isinstance(entry[0], list) or entry[0] in WIDGETS}
    assert set(params) & widgets <= CUSTOM_CHECKED.get(node_id, set()), node_id


# widgets whose VALIDATE_INPUTS check says more than the schema (ComfyUI skips its own check for them)
CUSTOM_CHECKED = {
    "AVSyncAudioLoader": {"audio_file"},                       # path inside the input folder, file exists
    "AVSyncSyncScore": {"flow_max_side"},                      # 0 or 16..8192
    "AVSyncKeyframeLocalizer": {"num_keyframes", "clip_frames"},
    "AVSyncKeyVIDGeneratorLoader": {"unet", "precision"},
    "AVSyncKeyVIDInterpolatorLoader": {"unet", "precision"},
    "AVSyncAudioSyncGuidance": {"w_a", "start", "end", "layers"},
    "AVSyncAudioSyncGuidanceModel": {"w_a", "start", "end", "layers"},
    "AVSyncKeyframeGenerator": {"width", "height"},            # a multiple of 8, before the model loads
    "AVSyncDualDirectionalSampler": {"width", "height"},       # range and multiple of 8, before the model loads
    "AVSyncMTVLoader": {"transformer"},                        # a pickled checkpoint: say how to convert it
}
