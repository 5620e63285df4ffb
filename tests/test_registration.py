"""Importing the folder the way ComfyUI does: a path under ``custom_nodes``, loaded by
file location under the folder's own name, with ComfyUI's own top-level ``nodes``
module present, and no ComfyUI installed."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOADER = textwrap.dedent("""
    import importlib.util, json, logging, os, sys, types
    logging.basicConfig(level=logging.ERROR, format="LOG %(message)s")
    sys.modules["nodes"] = types.ModuleType("nodes")  # ComfyUI's own top-level module
    path = sys.argv[1]
    name = os.path.basename(path)
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    print(json.dumps(sorted(mod.NODE_CLASS_MAPPINGS)))
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
""")


_NOT_IN_THE_PACK = shutil.ignore_patterns(".git", "tests", "bench", "*.egg-info", "__pycache__",
                                         "example_workflows", "models", ".pytest_cache")


def _skip_not_in_the_pack(folder, names):
    """What a user's clone would not hold: tests, caches, and any virtual environment beside the code
    (CI makes ``.venv`` and ``.venv-notorchaudio`` in the checkout; copying them cost ~9 GB per test
    and filled CI's disk)."""
    skipped = set(_NOT_IN_THE_PACK(folder, names))
    skipped |= {n for n in names if n.startswith(".venv") or (Path(folder, n) / "pyvenv.cfg").is_file()}
    return skipped


def _copy_pack(tmp_path) -> Path:
    dest = tmp_path / "custom_nodes" / "ComfyUI-AVSync"
    shutil.copytree(ROOT, dest, ignore=_skip_not_in_the_pack)
    return dest


def _load(pack: Path, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    # run outside the repo and without the installed package on the path, as ComfyUI would
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1", "AVSYNC_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-I", str(script), str(pack)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


def test_registers_every_node_like_comfyui(tmp_path):
    from avsync.nodes import NODE_CLASS_MAPPINGS

    res = _load(_copy_pack(tmp_path), tmp_path)
    assert res.returncode == 0, res.stderr
    import json

    assert json.loads(res.stdout.strip().splitlines()[-1]) == sorted(NODE_CLASS_MAPPINGS)


def test_a_broken_family_is_logged_and_the_others_register(tmp_path):
    pack = _copy_pack(tmp_path)
    (pack / "nodes" / "broken_nodes.py").write_text("import a_module_that_does_not_exist\n")
    res = _load(pack, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "AVSyncAudioLoader" in res.stdout
    assert "broken_nodes" in res.stderr and "a_module_that_does_not_exist" in res.stderr
