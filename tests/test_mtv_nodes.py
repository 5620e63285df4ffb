"""MTV nodes (AVSyncMTVLoader → AVSyncMTVGenerator) and ``avsync mtv`` on tiny random models saved in
the real on-disk layouts: a transformer converted by ``avsync convert mtv`` from a SAT/DeepSpeed
checkpoint, a diffusers CogVideoX VAE folder, a transformers T5 folder with its tokenizer and a
wav2vec2 folder."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from avsync import compat
from avsync.core.audio import make_audio
from avsync.core.errors import InputError, MissingModelError

pytest.importorskip("avsync.loaders.mtv")
pytest.importorskip("avsync.loaders.mtv_encoders")

from tests.factories.mtv_pipeline_files import write_tiny_mtv_models  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtv_models")
    names = write_tiny_mtv_models(root / "models", root / "release")
    compat.set_models_dir(root / "models")
    yield root / "models", names
    compat.set_models_dir(None)


GEN = dict(prompt="One person conversation. Person1 is speaking.", steps=2, cfg=3.5, seed=4, windows="released",
           max_windows=0, batch_cfg=True)


def _load(names, **kw):
    return dict(dict(variant="single", storage="bf16", block_swap=0, precision="fp32", **names), **kw)


def _audio(seconds: float, freq: float, sr: int = 22050, channels: int = 2) -> dict:
    t = torch.arange(int(seconds * sr)) / sr
    wav = torch.stack([0.3 * torch.sin(2 * math.pi * freq * (c + 1) * t) for c in range(channels)])
    return make_audio(wav, sr)


def _tracks(seconds=0.6):
    return dict(speech=_audio(seconds, 220.0), effects=_audio(seconds, 90.0), music=_audio(seconds, 440.0))


@pytest.fixture(scope="module")
def mtv_model(models):
    from avsync.nodes.mtv_nodes import AVSyncMTVLoader

    out = AVSyncMTVLoader().load(**_load(models[1]))
    assert "MTV single" in out["ui"]["text"][0]
    return out["result"][0]


def test_loader_and_generator_run_the_tiny_model(mtv_model):
    from avsync.nodes.mtv_nodes import AVSyncMTVGenerator

    # 0.6 s: seq_len ceil(0.6·24) = 15, padded N = 1 + 8·2 = 17 (9-frame windows of the tiny network),
    # times = (17 − 8)//4 = 2 windows → 5 + 4·2 = 13 frames rendered of the 15
    out = AVSyncMTVGenerator().generate(mtv_model, **_tracks(), **GEN)
    frames, fps = out["result"]
    assert fps == 24.0 and frames.shape == (13, 32, 48, 3)
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0 and float(frames.std()) > 0
    assert "13-14" in out["ui"]["text"][0]             # the frames the released windows never render
    # render_tail: one more window aligned to the end renders frames 13, 14; the same seed and model
    # give the released windows' frames bit for bit (same draws in the same order before the tail)
    tail = AVSyncMTVGenerator().generate(mtv_model, **_tracks(), **dict(GEN, windows="render_tail"))["result"][0]
    assert tail.shape[0] == 15 and torch.equal(tail[:13], frames)


def test_generator_refuses_bad_inputs(mtv_model):
    from avsync.nodes.mtv_nodes import AVSyncMTVGenerator

    # widget values: ComfyUI checks them against the schema (no VALIDATE_INPUTS); generate() again
    with pytest.raises(InputError, match="windows"):
        AVSyncMTVGenerator().generate(mtv_model, **_tracks(), **dict(GEN, windows="tail"))
    with pytest.raises(InputError, match="max_windows"):
        AVSyncMTVGenerator().generate(mtv_model, **_tracks(), **dict(GEN, max_windows=-1))
    with pytest.raises(InputError, match="speech2"):
        AVSyncMTVGenerator().generate(mtv_model, **_tracks(), speech2=_audio(0.6, 330.0), **GEN)
    with pytest.raises(InputError, match="mtv_model"):
        AVSyncMTVGenerator().generate(object(), **_tracks(), **GEN)
    with pytest.raises(InputError, match="effects"):
        AVSyncMTVGenerator().generate(mtv_model, **dict(_tracks(), effects={"waveform": torch.zeros(1, 2, 0),
                                                                            "sample_rate": 16000}), **GEN)


def test_multi_without_speech2_is_one_line_naming_it():
    # a user's mistake seen from the UI: the multi (two-speaker) model with speech2 left unconnected
    from avsync.samplers.mtv import _tracks

    track = (torch.zeros(1, 1600), 16000)
    with pytest.raises(InputError) as err:
        _tracks("multi", track, track, track, None)
    assert err.value.input_name == "speech2" and "\n" not in str(err.value)


def test_loader_refuses_missing_and_pickled_files(models):
    from avsync.nodes.mtv_nodes import AVSyncMTVLoader

    with pytest.raises(MissingModelError, match="mtv_accm_bf16.safetensors"):
        AVSyncMTVLoader().load(**_load(models[1], variant="accm", transformer="mtv_accm_bf16.safetensors"))
    assert "pickled" in AVSyncMTVLoader.VALIDATE_INPUTS(transformer="mp_rank_00_model_states.pt")
    with pytest.raises(InputError, match="variant"):
        AVSyncMTVLoader().load(**_load(models[1], variant="multi"))   # a one-speaker file as the multi variant
    choices = AVSyncMTVLoader.INPUT_TYPES()["required"]
    assert models[1]["vae"] in choices["vae"][0] and models[1]["t5"] in choices["t5"][0]
    assert models[1]["wav2vec"] in choices["wav2vec"][0]


def test_cli_mtv_writes_a_video_with_the_mix(models, tmp_path):
    import av

    models, names = models
    from avsync.cli import main
    from avsync.cli.common import save_audio_file

    mix = tmp_path / "mix.wav"
    save_audio_file(mix, _audio(0.6, 300.0))
    out = tmp_path / "out.mp4"
    argv = ["--models", str(models), "-q", "mtv", "--audio", str(mix), "--out", str(out), "--prompt", "a person",
            "--transformer", names["transformer"], "--vae", names["vae"], "--t5", names["t5"], "--wav2vec",
            str(models / "audio_encoders" / names["wav2vec"]),
            "--precision", "fp32", "--steps", "1", "--max-windows", "1"]
    assert main(argv) == 0
    with av.open(str(out)) as f:
        video = next(s for s in f.streams if s.type == "video")
        assert any(s.type == "audio" for s in f.streams)
        assert (video.codec_context.width, video.codec_context.height) == (48, 32)
        assert sum(1 for _ in f.decode(video=0)) == 9      # one 9-frame window of the tiny network
    # a bad value fails before any work, naming the flag; the output is not touched
    bad = tmp_path / "bad.mp4"
    base = ["--models", str(models), "mtv", "--audio", str(mix), "--out", str(bad)]
    assert main(base + ["--steps", "0"]) == 2 and not bad.exists()
    assert main(["--models", str(models), "mtv", "--audio", str(mix), "--out", str(bad),
                 "--variant", "multi"]) == 2 and not bad.exists()


def test_block_swap_and_fp8_storage_run_through_the_nodes(models, mtv_model):
    from avsync.nodes.mtv_nodes import AVSyncMTVGenerator, AVSyncMTVLoader
    from avsync.samplers.mtv import BlockSwapped

    quick = dict(GEN, steps=1, max_windows=1)
    resident = AVSyncMTVGenerator().generate(mtv_model, **_tracks(), **quick)["result"][0]
    swapped = AVSyncMTVLoader().load(**_load(models[1], block_swap=1))["result"][0]
    assert isinstance(swapped.transformer, BlockSwapped) and swapped.transformer.blocks_on_gpu == 1
    # on the CPU the streamed copies are plain tensors: the same numbers as the resident model
    assert torch.equal(AVSyncMTVGenerator().generate(swapped, **_tracks(), **quick)["result"][0], resident)
    assert swapped.transformer._swap is None            # detached after sampling
    fp8 = AVSyncMTVLoader().load(**_load(models[1], storage="fp8"))["result"][0]
    frames = AVSyncMTVGenerator().generate(fp8, **_tracks(), **quick)["result"][0]
    assert frames.shape == resident.shape and not torch.equal(frames, resident)   # rounded weights
    with pytest.raises(InputError, match="block_swap"):
        AVSyncMTVLoader().load(**_load(models[1], block_swap=3))                 # the tiny network has 2 blocks


def test_audio_projections_held_on_the_cpu_give_the_same_video(models, mtv_model):
    from avsync.nodes.mtv_nodes import AVSyncMTVGenerator, AVSyncMTVLoader
    from avsync.samplers.mtv import _module

    held = _module(mtv_model.transformer)
    assert held.audio.projections_held_outside                       # the loader's default
    assert not any(k.startswith("audio.audio_proj") for k in held.state_dict())
    inside = AVSyncMTVLoader().load(**_load(models[1], audio_proj_on_cpu=False))["result"][0]
    assert not _module(inside.transformer).audio.projections_held_outside
    quick = dict(GEN, steps=2, max_windows=1)
    a = AVSyncMTVGenerator().generate(mtv_model, **_tracks(), **quick)["result"][0]
    b = AVSyncMTVGenerator().generate(inside, **_tracks(), **quick)["result"][0]
    assert torch.equal(a, b)


def test_memory_check_refuses_before_any_model_runs(mtv_model):
    from avsync.samplers.mtv import encode_audio, generate_mtv

    calls = []
    # wav2vec2's CNN runs first in MTVAudioEncoder.features
    hook = mtv_model.audio_encoder.module.wav2vec.feature_extractor.register_forward_pre_hook(
        lambda *a: calls.append(1))
    tracks = {k: (a["waveform"][0], a["sample_rate"]) for k, a in _tracks().items()}
    try:
        with pytest.raises(InputError, match="memory"):
            generate_mtv(mtv_model, "a person", **tracks, free_bytes=2 ** 20)   # 1 MiB "free"
        assert calls == []
        encode_audio(mtv_model, dict(tracks, speech2=None), 9)                # the hook does see wav2vec run
        assert calls
    finally:
        hook.remove()


def test_speech_left_unconnected_is_silence(mtv_model):
    from avsync.nodes.mtv_nodes import AVSyncMTVGenerator

    tracks = _tracks()
    quick = dict(GEN, steps=1, max_windows=1)
    silent = dict(tracks, speech=make_audio(torch.zeros(2, int(0.6 * 22050)), 22050))
    without = AVSyncMTVGenerator().generate(mtv_model, effects=tracks["effects"], music=tracks["music"], **quick)
    assert torch.equal(without["result"][0], AVSyncMTVGenerator().generate(mtv_model, **silent, **quick)["result"][0])


def test_no_tokenizer_outside_comfyui_names_the_t5_input(models, tmp_path):
    from avsync.samplers.mtv import load_mtv_model

    root, names = models
    lone_t5 = tmp_path / "t5_without_tokenizer"
    shutil.copytree(root / "text_encoders" / names["t5"], lone_t5, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(InputError, match="^t5: no T5 tokenizer"):
        load_mtv_model("single", root / "avsync" / "mtv" / names["transformer"], root / "avsync" / "mtv" / names["vae"],
                       lone_t5, root / "audio_encoders" / names["wav2vec"], tokenizer=None)


def test_cli_mtv_demixes_with_a_model_file(models, tmp_path, monkeypatch, capsys):
    from avsync.cli import main
    from avsync.cli.common import save_audio_file
    from avsync.nodes.demix_nodes import AVSyncDemixer
    from tests.factories.demix import install_tiny_mrx

    models, names = models
    mrx = install_tiny_mrx(tmp_path / "elsewhere")       # a file outside the model folders, given by path
    mix, speech, effects = tmp_path / "mix.wav", tmp_path / "speech.wav", tmp_path / "effects.wav"
    for path, freq in ((mix, 300.0), (speech, 220.0), (effects, 90.0)):
        save_audio_file(path, _audio(0.6, freq))
    seen = []
    original = AVSyncDemixer.demix

    def spy(self, audio, method="auto", chunk_seconds=20.0, overlap=0.1, demix_model=None):
        seen.append((method, demix_model))
        return original(self, audio, method, chunk_seconds, overlap, demix_model)

    monkeypatch.setattr(AVSyncDemixer, "demix", spy)
    base = ["--models", str(models), "-q", "mtv", "--audio", str(mix), "--speech", str(speech), "--effects",
            str(effects), "--prompt", "a person", "--transformer", names["transformer"], "--vae", names["vae"],
            "--t5", names["t5"], "--wav2vec", str(models / "audio_encoders" / names["wav2vec"]),
            "--precision", "fp32", "--steps", "1", "--max-windows", "1"]
    out = tmp_path / "out.mp4"
    assert main(base + ["--out", str(out), "--demix-model", str(mrx)]) == 0 and out.is_file()
    (method, model), = seen                            # music was demixed (auto + a model file → the model)
    assert method == "auto" and model is not None and model.family == "mrx"
    # a wrong file, or a model of the wrong family, fails in one line naming the flag, before any work
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"")
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "b1.mp4"), "--demix-model", str(bad)]) == 2
    assert "MRX or BandIt v2 demix model" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b2.mp4"), "--demix-model", str(mrx),
                        "--demix-method", "bandit_v2"]) == 2
    assert "--demix-model" in capsys.readouterr().err
    assert len(seen) == 1 and not (tmp_path / "b1.mp4").exists() and not (tmp_path / "b2.mp4").exists()
