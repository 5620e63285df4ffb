"""compat.py: plain fallbacks outside ComfyUI, and the real calls when ComfyUI's modules
are loaded (simulated here with stand-in modules that record what AVSync calls)."""

import sys
import types

import pytest
import torch

from avsync import compat


def test_progress_outside_comfyui_calls_back_and_checks_interrupt():
    seen = []
    p = compat.Progress(3, "test", callback=lambda v, t: seen.append((v, t)))
    p.update()
    p.update(2)
    assert seen == [(1, 3), (3, 3)]
    compat.request_interrupt()
    with pytest.raises(compat.Interrupted):
        p.update()
    compat.check_interrupted()  # the flag was consumed


def test_models_dir_and_listing(tmp_path, monkeypatch):
    monkeypatch.setenv("AVSYNC_MODELS_DIR", str(tmp_path))
    compat.set_models_dir(None)
    assert compat.models_dir() == tmp_path.resolve()
    d = tmp_path / "avsync" / "localizer"
    d.mkdir(parents=True)
    (d / "a.safetensors").write_bytes(b"x")
    (d / "notes.txt").write_text("x")
    (d / "sub").mkdir()
    (d / "sub" / "b.safetensors").write_bytes(b"x")
    assert compat.list_model_files("avsync_localizer") == ["a.safetensors", "sub/b.safetensors"]
    assert compat.find_model_file("avsync_localizer", "sub/b.safetensors") == d / "sub" / "b.safetensors"
    assert compat.find_model_file("avsync_localizer", "c.safetensors") is None
    other = tmp_path / "elsewhere"
    compat.set_models_dir(other)  # --models wins over the environment
    try:
        assert compat.model_folder_paths("avsync_localizer") == [other.resolve() / "avsync" / "localizer"]
    finally:
        compat.set_models_dir(None)


def test_missing_model_error_names_file_folder_and_source(tmp_path, monkeypatch):
    from avsync.core.errors import MissingModelError
    from avsync.loaders import model_files

    monkeypatch.setenv("AVSYNC_MODELS_DIR", str(tmp_path))
    spec = model_files.ModelFileSpec("t", "tiny.safetensors", "avsync_demix", "https://example.org/tiny", "test")
    with pytest.raises(MissingModelError) as info:
        model_files.resolve(spec)
    msg = str(info.value)
    assert "tiny.safetensors" in msg and "avsync_demix" in msg and "https://example.org/tiny" in msg
    assert str(tmp_path / "avsync" / "demix") in msg


@pytest.fixture
def fake_comfy(tmp_path, monkeypatch):
    """Stand-ins for the ComfyUI modules compat.py talks to, recording the calls."""
    calls = []
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.get_free_memory = lambda dev=None: 123
    mm.soft_empty_cache = lambda: calls.append("soft_empty_cache")
    mm.throw_exception_if_processing_interrupted = lambda: calls.append("interrupt_check")
    mm.load_models_gpu = lambda models, memory_required=0, force_full_load=False: calls.append(
        ("load_models_gpu", len(models), force_full_load))

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            calls.append(("bar", total))

        def update_absolute(self, value, total=None, preview=None):
            calls.append(("bar_update", value, total))

    utils.ProgressBar = ProgressBar
    mp = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model = model
            calls.append("patcher")

        def load(self):  # what ComfyUI's ModelPatcher.load does to the model it wraps
            self.model.device = torch.device("cpu")
            self.model.model_loaded_weight_memory = 0

    mp.ModelPatcher = ModelPatcher
    comfy = types.ModuleType("comfy")
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {"avsync_demix": ([str(tmp_path / "extra")], set())}
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]
    fp.get_input_directory = lambda: str(tmp_path / "input")
    fp.get_annotated_filepath = lambda name: str(tmp_path / "input" / name)
    for name, mod in {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                      "comfy.model_patcher": mp, "folder_paths": fp}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls, fp


def test_inside_comfyui_uses_progressbar_patcher_and_folders(fake_comfy, tmp_path):
    calls, fp = fake_comfy
    assert compat.in_comfyui()
    p = compat.Progress(2)
    p.update()
    assert ("bar", 2) in calls and ("bar_update", 1, 2) in calls
    compat.check_interrupted()
    assert "interrupt_check" in calls
    class HasDeviceProperty(torch.nn.Linear):  # like diffusers/transformers models
        @property
        def device(self):
            return self.weight.device

    net = HasDeviceProperty(2, 2)
    m = compat.manage_model(net)
    assert "patcher" in calls and m.patcher is not None
    m.patcher.load()  # must not try to set net.device
    assert m.load() is net
    assert ("load_models_gpu", 1, True) in calls  # our plain-torch layers cannot be partially loaded
    compat.register_model_folders()
    # extra_model_paths.yaml's entry is kept, ComfyUI's default folder appended, filter set
    paths, exts = fp.folder_names_and_paths["avsync_demix"]
    assert paths[0] == str(tmp_path / "extra") and paths[1].endswith("avsync/demix")
    assert ".safetensors" in exts
    assert set(compat.AVSYNC_MODEL_FOLDERS) <= set(fp.folder_names_and_paths)
    assert compat.input_directory() == tmp_path / "input"


def test_loader_file_choices_list_expected_files_first(tmp_path, monkeypatch):
    from avsync.loaders.model_files import ModelFileSpec, file_choices

    monkeypatch.setenv("AVSYNC_MODELS_DIR", str(tmp_path))
    a = ModelFileSpec("a", "a.safetensors", "avsync_demix", "src", "A")
    b = ModelFileSpec("b", "b.safetensors", "avsync_demix", "src", "B")
    assert file_choices([a, b]) == ["a.safetensors", "b.safetensors"]  # listed even when absent
    d = tmp_path / "avsync" / "demix"
    d.mkdir(parents=True)
    for name in ("b.safetensors", "mine.safetensors", "x.ckpt"):
        (d / name).write_bytes(b"x")
    assert file_choices([a, b]) == ["a.safetensors", "b.safetensors", "mine.safetensors"]


def test_cancel_is_checked_between_steps_even_when_the_bar_hook_is_throttled(fake_comfy, monkeypatch):
    """Newer ComfyUI calls the ProgressBar hook (where Cancel used to be noticed) at most every
    100 ms; every progress update also asks model_management directly."""
    calls, _ = fake_comfy
    p = compat.Progress(3)
    calls.clear()
    p.update()
    assert calls == [("bar_update", 1, 3), "interrupt_check"]

    class Cancelled(Exception):
        pass

    mm = sys.modules["comfy.model_management"]
    monkeypatch.delattr(mm, "throw_exception_if_processing_interrupted")
    mm.processing_interrupted = lambda: True  # an older/newer API with only the flag
    mm.InterruptProcessingException = Cancelled
    with pytest.raises(Cancelled):
        p.update()


def test_default_callback_can_receive_the_description():
    seen = []
    compat.set_default_progress_callback(lambda v, t, d: seen.append((v, t, d)), with_desc=True)
    try:
        compat.Progress(2, "AVSync demix").update()
    finally:
        compat.set_default_progress_callback(None)
    assert seen == [(1, 2, "AVSync demix")]
