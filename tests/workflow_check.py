"""Validate ComfyUI workflows (UI format and API format) against node schemas.

Core nodes come from a snapshot of ComfyUI 0.3.64's ``/object_info``
(``tests/data/comfyui/object_info_core_0.3.64.json``); AVSync's nodes are described the
same way from their classes (:func:`object_info_for`), as ComfyUI's server does.
Each check returns a list of problems (empty = valid), so a failing test shows all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORE_OBJECT_INFO = Path(__file__).parent / "data" / "comfyui" / "object_info_core_0.3.64.json"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".wav", ".flac", ".mp3",
                   ".ogg", ".opus", ".m4a", ".png", ".jpg", ".jpeg", ".webp", ".mp4", ".webm", ".mov", ".mkv")
SEED_NAMES = {"seed", "noise_seed"}


def object_info_for(cls, node_id: str) -> dict:
    """What ComfyUI's ``/object_info`` serves for a V1 node class."""
    spec = cls.INPUT_TYPES()
    return {
        "input": {k: v for k, v in spec.items() if k in ("required", "optional", "hidden")},
        "input_order": {k: list(v.keys()) for k, v in spec.items() if k in ("required", "optional", "hidden")},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        "name": node_id,
        "category": getattr(cls, "CATEGORY", ""),
    }


def load_object_info() -> dict:
    from avsync.nodes import NODE_CLASS_MAPPINGS

    info = json.loads(CORE_OBJECT_INFO.read_text())
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        info[node_id] = object_info_for(cls, node_id)
    return info


# ---------------------------------------------------------------------------------- inputs

def _input_spec(info: dict, name: str):
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            return info["input"][section][name], section
    return None, None


def _type_and_opts(spec) -> tuple[Any, dict]:
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return t, opts


def _is_widget(spec) -> bool:
    t, opts = _type_and_opts(spec)
    if isinstance(t, list):
        return True
    return t in WIDGET_TYPES and not opts.get("forceInput", False)


def _combo_options(spec) -> list | None:
    t, opts = _type_and_opts(spec)
    if isinstance(t, list):
        return t
    if t == "COMBO":
        return opts.get("options", [])
    return None


def _is_file_list(spec, options: list) -> bool:
    """Combos whose options are files on the user's machine (uploads, model folders):
    membership cannot be checked against a snapshot, only the value's kind."""
    _, opts = _type_and_opts(spec)
    if any(k.endswith("_upload") for k in opts):
        return True
    # VAELoader lists "pixel_space" next to the VAE files (nodes.py:VAELoader.vae_list): not a file
    real = [o for o in options if isinstance(o, str) and not o.startswith("(") and o != "pixel_space"]
    return not real or all(o.lower().endswith(FILE_EXTENSIONS) or "/" in o for o in real)


def check_value(node: str, name: str, spec, value) -> list[str]:
    t, opts = _type_and_opts(spec)
    where = f"{node}.{name}"
    options = _combo_options(spec)
    if options is not None:
        if not isinstance(value, str):
            return [f"{where}: combo value {value!r} is not a string"]
        if not _is_file_list(spec, options) and value not in options:
            return [f"{where}: {value!r} not in {options}"]
        return []
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: {value!r} is not an INT"]
    elif t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f"{where}: {value!r} is not a FLOAT"]
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            return [f"{where}: {value!r} is not a BOOLEAN"]
    elif t == "STRING":
        if not isinstance(value, str):
            return [f"{where}: {value!r} is not a STRING"]
        return []
    else:
        return [f"{where}: socket input of type {t} given a literal value {value!r}"]
    if "min" in opts and value < opts["min"]:
        return [f"{where}: {value} < min {opts['min']}"]
    if "max" in opts and value > opts["max"]:
        return [f"{where}: {value} > max {opts['max']}"]
    return []


def types_match(out_type: str, in_type) -> bool:
    if isinstance(in_type, list):  # a combo input fed by a link
        in_type = "COMBO"
    if out_type == "*" or in_type == "*":
        return True
    return bool(set(str(out_type).split(",")) & set(str(in_type).split(",")))


# ---------------------------------------------------------------------------------- API format

def check_api_workflow(prompt: dict, info: dict) -> list[str]:
    problems = []
    if not prompt:
        return ["workflow is empty"]
    for nid, node in prompt.items():
        ct = node.get("class_type")
        if ct not in info:
            problems.append(f"node {nid}: unknown class_type {ct!r}")
            continue
        ninfo = info[ct]
        inputs = node.get("inputs", {})
        for name in ninfo["input"].get("required", {}):
            if name not in inputs:
                problems.append(f"node {nid} ({ct}): required input {name!r} missing")
        for name, value in inputs.items():
            spec, _ = _input_spec(ninfo, name)
            if spec is None:
                problems.append(f"node {nid} ({ct}): unknown input {name!r}")
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
                src = prompt.get(value[0])
                if src is None:
                    problems.append(f"node {nid} ({ct}).{name}: links to missing node {value[0]}")
                    continue
                sinfo = info.get(src.get("class_type"))
                if sinfo is None:
                    continue
                if value[1] >= len(sinfo["output"]):
                    problems.append(f"node {nid} ({ct}).{name}: source slot {value[1]} out of range")
                    continue
                out_t = sinfo["output"][value[1]]
                if not types_match(out_t, _type_and_opts(spec)[0]):
                    problems.append(f"node {nid} ({ct}).{name}: {out_t} cannot feed {_type_and_opts(spec)[0]}")
            else:
                problems += check_value(f"node {nid} ({ct})", name, spec, value)
    if not any(info[n["class_type"]].get("output_node") for n in prompt.values() if n.get("class_type") in info):
        problems.append("workflow has no output node, so ComfyUI would run nothing")
    return problems


# ---------------------------------------------------------------------------------- UI format

def _widget_names(ninfo: dict) -> list[tuple[str, Any]]:
    names = []
    for section in ("required", "optional"):
        for name in ninfo.get("input_order", {}).get(section, ninfo["input"].get(section, {}).keys()):
            spec = ninfo["input"][section][name]
            if _is_widget(spec):
                names.append((name, spec))
    return names


def check_ui_workflow(wf: dict, info: dict) -> list[str]:
    problems = []
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        if key not in wf:
            problems.append(f"UI workflow has no {key!r}")
    if problems:
        return problems
    nodes = {n["id"]: n for n in wf["nodes"]}
    if len(nodes) != len(wf["nodes"]):
        problems.append("duplicate node ids")
    if nodes and max(nodes) > wf["last_node_id"]:
        problems.append("last_node_id is smaller than a node id")
    links = {}
    for link in wf["links"]:
        lid, src, sslot, dst, dslot, ltype = link[:6]
        links[lid] = link
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid}: connects a missing node")
            continue
        s, d = nodes[src], nodes[dst]
        sinfo, dinfo = info.get(s["type"]), info.get(d["type"])
        if sinfo is None or dinfo is None:
            continue
        if sslot >= len(sinfo["output"]):
            problems.append(f"link {lid}: source slot {sslot} out of range for {s['type']}")
            continue
        out_t = sinfo["output"][sslot]
        if dslot >= len(d.get("inputs", [])):
            problems.append(f"link {lid}: target slot {dslot} out of range for {d['type']}")
            continue
        in_name = d["inputs"][dslot]["name"]
        spec, _ = _input_spec(dinfo, in_name)
        if spec is None:
            problems.append(f"link {lid}: {d['type']} has no input {in_name!r}")
            continue
        in_t = _type_and_opts(spec)[0]
        if not types_match(out_t, in_t) or not types_match(ltype, in_t):
            problems.append(f"link {lid}: {s['type']}[{sslot}] {out_t} -> {d['type']}.{in_name} {in_t} (link says {ltype})")
        if d["inputs"][dslot].get("link") != lid:
            problems.append(f"link {lid}: {d['type']}.{in_name} does not point back to it")
        if lid not in (s.get("outputs", [])[sslot].get("links") or []):
            problems.append(f"link {lid}: {s['type']} output {sslot} does not list it")
    if wf["links"] and max(links) > wf["last_link_id"]:
        problems.append("last_link_id is smaller than a link id")
    for nid, n in nodes.items():
        ninfo = info.get(n["type"])
        if ninfo is None:
            problems.append(f"node {nid}: unknown node type {n['type']!r}")
            continue
        where = f"node {nid} ({n['type']})"
        for inp in n.get("inputs", []):
            spec, section = _input_spec(ninfo, inp["name"])
            if spec is None:
                problems.append(f"{where}: unknown input {inp['name']!r}")
            elif inp.get("link") is None and section == "required" and not _is_widget(spec):
                problems.append(f"{where}: required input {inp['name']!r} is not connected")
            elif inp.get("link") is not None and inp["link"] not in links:
                problems.append(f"{where}: input {inp['name']!r} points to missing link {inp['link']}")
        for name, spec in ninfo["input"].get("required", {}).items():
            if not _is_widget(spec) and not any(i["name"] == name for i in n.get("inputs", [])):
                problems.append(f"{where}: required socket {name!r} absent")
        for i, out in enumerate(n.get("outputs", [])):
            if i >= len(ninfo["output"]):
                problems.append(f"{where}: output slot {i} does not exist")
            elif not types_match(ninfo["output"][i], out["type"]):
                problems.append(f"{where}: output {i} type {out['type']} != {ninfo['output'][i]}")
        values = list(n.get("widgets_values", []))
        pos = 0
        has_upload = False
        for name, spec in _widget_names(ninfo):
            _, opts = _type_and_opts(spec)
            has_upload |= any(k.endswith("_upload") for k in opts)
            if pos >= len(values):
                problems.append(f"{where}: widgets_values has no value for {name!r}")
                break
            problems += check_value(where, name, spec, values[pos])
            pos += 1
            t = _type_and_opts(spec)[0]
            if t == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES):
                if pos >= len(values) or values[pos] not in ("fixed", "increment", "decrement", "randomize"):
                    problems.append(f"{where}: {name!r} needs its control_after_generate value after it")
                pos += 1
        extra = values[pos:]
        if extra and not (has_upload and all(v in (None, "image", "audio", "video", "") for v in extra)):
            problems.append(f"{where}: {len(extra)} widget value(s) more than the node has: {extra}")
    return problems


def api_from_ui(wf: dict, info: dict) -> dict:
    """Convert a UI workflow to API format, as the frontend does when queueing."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}
    prompt = {}
    for nid, n in nodes.items():
        if n.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        ninfo = info[n["type"]]
        inputs = {}
        values = list(n.get("widgets_values", []))
        pos = 0
        for name, spec in _widget_names(ninfo):
            inputs[name] = values[pos]
            pos += 1
            _, opts = _type_and_opts(spec)
            if _type_and_opts(spec)[0] == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES):
                pos += 1
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                l = links[inp["link"]]
                inputs[inp["name"]] = [str(l[1]), l[2]]
        prompt[str(nid)] = {"class_type": n["type"], "inputs": inputs}
    return prompt
