"""Audio Sync Guidance on ComfyUI core's audio-driven models (AVSyncAudioSyncGuidanceModel),
without ComfyUI: small stand-ins of the pieces of core the patch touches —

* ``ModelPatcher`` (clone, get_model_object, add_object_patch, add_wrapper_with_key,
  set_model_sampler_calc_cond_batch_function / post_cfg_function, model_options),
* ``calc_cond_batch`` (``comfy/samplers.py:_calc_cond_batch``: condition lists concatenated in
  one ``apply_model`` call, ``transformer_options["cond_or_uncond"]`` = list index per chunk),
* ``sampling_function`` + ``cfg_function`` (calc function, CFG, post-CFG functions),
* the audio modules with core's call signatures: ``AudioInjector_WAN.forward(x, block_id,
  audio_emb, audio_emb_global, seq_len)`` writing its residual in place, and
  ``AudioCrossAttentionWrapper.forward(x, audio, transformer_options)``.

The real-ComfyUI check (a tiny S2V checkpoint through POST /prompt) is tools/asg_s2v_check.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from avsync import compat
from avsync.core.errors import InputError
from avsync.nodes.asg_nodes import AVSyncAudioSyncGuidanceModel
from avsync.samplers.asg import AudioSyncGuidanceSettings
from avsync.samplers.asg_comfy import (AudioSyncHook, describe_core_audio_layers, find_core_audio_layers,
                                       off_sync_row_mask)

APPLY_MODEL = "apply_model"
D, L, SEQ = 8, 6, 4          # channels, tokens (SEQ video tokens + 2 reference tokens)


# ---------------------------------------------------------------- stand-ins of core's models

class Injector(nn.Module):
    """AudioInjector_WAN's call shape: residual for blocks in ``injected_block_id``, written in place."""

    def __init__(self, block_ids):
        super().__init__()
        self.injected_block_id = {b: k for k, b in enumerate(block_ids)}
        self.injector = nn.ModuleList(nn.Linear(D, D) for _ in block_ids)

    def forward(self, x, block_id, audio_emb, audio_emb_global, seq_len):
        k = self.injected_block_id.get(block_id)
        if k is None:
            return x
        x[:, :seq_len] = x[:, :seq_len] + torch.tanh(self.injector[k](audio_emb))[:, None]
        return x


class TinyS2V(nn.Module):
    def __init__(self, blocks=4, inject=(0, 2)):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(blocks))
        self.audio_injector = Injector(inject)

    def forward(self, x, text, audio, transformer_options={}):
        x = x + text[:, None]
        for i, block in enumerate(self.blocks):
            x = torch.tanh(block(x))
            x = self.audio_injector(x, i, audio, None, SEQ)
        return x


class AudioWrapper(nn.Module):
    """AudioCrossAttentionWrapper's call shape."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x, audio, transformer_options={}):
        return x + torch.tanh(self.proj(audio))[:, None]


class HumoBlock(nn.Module):
    def __init__(self, audio: bool):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.audio_cross_attn_wrapper = AudioWrapper() if audio else None

    def forward(self, x, audio, transformer_options):
        x = torch.tanh(self.lin(x))
        if self.audio_cross_attn_wrapper is not None:
            x = self.audio_cross_attn_wrapper(x, audio, transformer_options=transformer_options)
        return x


class TinyHumo(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(HumoBlock(a) for a in (False, True, True))

    def forward(self, x, text, audio, transformer_options={}):
        x = x + text[:, None]
        for block in self.blocks:
            x = block(x, audio, transformer_options)
        return x


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(D, D)])


class ModelSampling:
    """percent_to_sigma as core's ModelSamplingDiscrete: 0 → huge, 1 → 0, else decreasing."""

    @staticmethod
    def percent_to_sigma(p):
        return 999999999.9 if p <= 0 else 0.0 if p >= 1 else 10.0 * (1.0 - p)


class BaseModel(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSampling()


def _get_attr(obj, name):
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class Patcher:
    """The ModelPatcher calls compat.patch_audio_sync_guidance makes, and apply_model with
    object patches applied and APPLY_MODEL wrappers run as WrapperExecutor does."""

    def __init__(self, model):
        self.model, self.model_options, self.object_patches, self.wrappers = model, {"transformer_options": {}}, {}, {}
        self.calls = []   # rows of each apply_model call

    def clone(self):
        c = Patcher(self.model)
        c.model_options = copy.deepcopy({k: v for k, v in self.model_options.items() if k != "sampler_post_cfg_function"})
        c.model_options["sampler_post_cfg_function"] = list(self.model_options.get("sampler_post_cfg_function", []))
        for k, v in self.model_options.items():
            if callable(v):
                c.model_options[k] = v
        c.object_patches, c.wrappers = dict(self.object_patches), {k: dict(v) for k, v in self.wrappers.items()}
        return c

    def get_model_object(self, name):
        return self.object_patches[name] if name in self.object_patches else _get_attr(self.model, name)

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def set_model_sampler_calc_cond_batch_function(self, fn):
        self.model_options["sampler_calc_cond_batch_function"] = fn

    def set_model_sampler_post_cfg_function(self, fn):
        self.model_options["sampler_post_cfg_function"] = self.model_options.get("sampler_post_cfg_function", []) + [fn]

    def apply_model(self, x, sigma, text, audio, transformer_options):
        self.calls.append(x.shape[0])
        saved = {}
        for name, obj in self.object_patches.items():
            owner, attr = name.rsplit(".", 1)
            target = _get_attr(self.model, owner)
            saved[name] = (target, attr, target.__dict__.get(attr))
            setattr(target, attr, obj)
        try:
            wrappers = [w for ws in self.wrappers.get(APPLY_MODEL, {}).values() for w in ws]

            def run(i, *args, **kwargs):
                if i == len(wrappers):
                    xx, _, tt, aa, opts = args
                    return self.model.diffusion_model(xx, tt, aa, transformer_options=opts)
                return wrappers[i](lambda *a, **k: run(i + 1, *a, **k), *args, **kwargs)

            return run(0, x, sigma, text, audio, transformer_options)
        finally:
            for target, attr, before in saved.values():
                if before is None:
                    del target.__dict__[attr]
                else:
                    setattr(target, attr, before)


def calc_cond_batch(model, conds, x, sigma, model_options):
    """comfy/samplers.py:_calc_cond_batch for one area-less condition per list: every non-None
    list in one call, in list order; ``cond_or_uncond`` holds each chunk's list index."""
    idx = [i for i, c in enumerate(conds) if c is not None]
    opts = dict(model_options.get("transformer_options", {}))
    opts["cond_or_uncond"] = idx
    text = torch.cat([conds[i][0]["text"] for i in idx])
    audio = torch.cat([conds[i][0]["audio"] for i in idx])
    out = model.apply_model(torch.cat([x] * len(idx)), sigma, text, audio, opts).chunk(len(idx))
    res = [torch.zeros_like(x) for _ in conds]
    for o, i in enumerate(idx):
        res[i] = out[o]
    return res


def sampling_function(model, x, sigma, uncond, cond, cfg):
    """comfy/samplers.py:sampling_function + cfg_function (no sampler_cfg_function)."""
    opts = model.model_options
    conds = [cond, uncond]
    if "sampler_calc_cond_batch_function" in opts:
        out = opts["sampler_calc_cond_batch_function"]({"conds": conds, "input": x, "sigma": sigma, "model": model,
                                                        "model_options": opts})
    else:
        out = calc_cond_batch(model, conds, x, sigma, opts)
    result = out[1] + (out[0] - out[1]) * cfg
    for fn in opts.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": cfg, "model": model,
                     "uncond_denoised": out[1], "cond_denoised": out[0], "sigma": sigma, "model_options": opts,
                     "input": x})
    return result


# ---------------------------------------------------------------- fixtures and helpers

def make(kind="s2v", batch=2, seed=0):
    torch.manual_seed(seed)
    net = {"s2v": TinyS2V, "humo": TinyHumo, "plain": Plain}[kind]()
    x = torch.randn(batch, L, D)
    cond = [{"text": torch.randn(batch, D), "audio": torch.randn(batch, D)}]
    uncond = [{"text": torch.zeros(batch, D), "audio": torch.zeros(batch, D)}]
    return Patcher(BaseModel(net)), x, cond, uncond


def patch(model, w_a=2.0, start=0.0, end=1.0, layers="all"):
    settings = AudioSyncGuidanceSettings.from_text(w_a, start, end, layers)
    return compat.patch_audio_sync_guidance(model, settings, calc_cond_batch=calc_cond_batch,
                                            apply_model_wrapper_type=APPLY_MODEL)


def no_audio_prediction(model, x, cond, blocks=None):
    """The positive prediction with audio injection removed by hand (ground truth of the skip)."""
    net = model.model.diffusion_model
    with torch.no_grad():
        if isinstance(net, TinyS2V):
            keep = dict(net.audio_injector.injected_block_id)
            net.audio_injector.injected_block_id = {b: k for b, k in keep.items() if blocks is not None and b not in blocks}
            try:
                return net(x, cond[0]["text"], cond[0]["audio"])
            finally:
                net.audio_injector.injected_block_id = keep
        wrappers = {i: b.audio_cross_attn_wrapper for i, b in enumerate(net.blocks)}
        for i, b in enumerate(net.blocks):
            if blocks is None or i in blocks:
                b.audio_cross_attn_wrapper = None
        try:
            return net(x, cond[0]["text"], cond[0]["audio"])
        finally:
            for i, b in enumerate(net.blocks):
                b.audio_cross_attn_wrapper = wrappers[i]


# ---------------------------------------------------------------- tests

def test_audio_layers_of_core_models_are_found():
    s2v = find_core_audio_layers(TinyS2V(6, (0, 4, 2)))
    assert (s2v.family, s2v.blocks) == ("wan-s2v", (0, 4, 2))          # injector order, as core numbers them
    assert s2v.patch_names([0, 1]) == ["diffusion_model.audio_injector.forward"]
    humo = find_core_audio_layers(TinyHumo())
    assert (humo.family, humo.blocks) == ("humo", (1, 2))
    assert humo.patch_names([1]) == ["diffusion_model.blocks.2.audio_cross_attn_wrapper.forward"]
    assert find_core_audio_layers(Plain()) is None
    assert describe_core_audio_layers(humo) == "2 audio layers (humo, in blocks 1, 2)"


def test_a_model_without_audio_layers_is_refused_with_a_clear_message():
    model, *_ = make("plain")
    with pytest.raises(InputError, match="^model: this model has no audio layers"):
        AVSyncAudioSyncGuidanceModel().patch(model, 2.0, 0.0, 1.0, "all")
    s2v, *_ = make("s2v")
    with pytest.raises(InputError, match=r"^layers: audio layer 5 does not exist: this model \(TinyS2V\) has 2"):
        AVSyncAudioSyncGuidanceModel().patch(s2v, 2.0, 0.0, 1.0, "5")


def test_w_a_zero_returns_the_model_unchanged():
    model, *_ = make("s2v")
    out = AVSyncAudioSyncGuidanceModel().patch(model, 0.0, 0.0, 1.0, "all")
    assert out["result"][0] is model
    assert out["ui"]["text"] == ["ASG off (w_a = 0 or an empty range); the model has 2 audio layers (wan-s2v, in blocks 0, 2)"]


def test_off_sync_rows_mask():
    assert off_sync_row_mask([0, 1, 2], 6, 2).tolist() == [False] * 4 + [True] * 2
    assert off_sync_row_mask([0, 1], 4, 2) is None
    assert off_sync_row_mask([2, 0], 4, 2).tolist() == [True, True, False, False]


@pytest.mark.parametrize("kind", ["s2v", "humo"])
def test_batched_off_sync_pass_matches_the_formula_with_audio_skipped(kind):
    model, x, cond, uncond = make(kind)
    plain = sampling_function(model, x, torch.tensor([5.0]), uncond, cond, cfg=4.0)
    patched, hook = patch(model, w_a=2.0)
    with torch.no_grad():
        out = sampling_function(patched, x, torch.tensor([5.0]), uncond, cond, cfg=4.0)
    assert patched.calls == [6]                      # cond, uncond and off-sync rows in one call
    assert hook.off_sync_calls == 1 and hook.rows.mask is None
    with torch.no_grad():
        cond_pred = model.model.diffusion_model(x, cond[0]["text"], cond[0]["audio"])
    off = no_audio_prediction(model, x, cond)
    # same rows, same modules; only the batch size of the call differs (2 vs 6): measured 0 here
    assert (out - (plain + 2.0 * (cond_pred - off))).abs().max() <= 1e-6
    assert (out - plain).abs().max() > 1e-2


@pytest.mark.parametrize("kind, layers, blocks", [("s2v", "1", {2}), ("humo", "0", {1})])
def test_a_subset_skips_exactly_those_layers(kind, layers, blocks):
    model, x, cond, uncond = make(kind)
    plain = sampling_function(model, x, torch.tensor([5.0]), uncond, cond, cfg=4.0)
    patched, _ = patch(model, w_a=1.5, layers=layers)
    with torch.no_grad():
        out = sampling_function(patched, x, torch.tensor([5.0]), uncond, cond, cfg=4.0)
        cond_pred = model.model.diffusion_model(x, cond[0]["text"], cond[0]["audio"])
    expected_off = no_audio_prediction(model, x, cond, blocks)
    assert (out - (plain + 1.5 * (cond_pred - expected_off))).abs().max() <= 1e-6
    all_off = no_audio_prediction(model, x, cond)
    assert (expected_off - all_off).abs().max() > 1e-2           # the other layer was kept


def test_separate_pass_when_another_calc_function_is_present_equals_the_batched_pass():
    model, x, cond, uncond = make("s2v")
    batched, _ = patch(model)
    other = model.clone()
    other.set_model_sampler_calc_cond_batch_function(
        lambda a: calc_cond_batch(a["model"], a["conds"], a["input"], a["sigma"], a["model_options"]))
    separate, hook = patch(other)
    with torch.no_grad():
        one = sampling_function(batched, x, torch.tensor([5.0]), uncond, cond, cfg=4.0)
        two = sampling_function(separate, x, torch.tensor([5.0]), uncond, cond, cfg=4.0)
    assert separate.calls == [4, 2] and hook.off_sync_calls == 1   # SLG's way: cond+uncond, then off-sync
    # batch 6 vs 4 + 2 of the same per-row modules: measured 0 on this machine
    assert (one - two).abs().max() <= 1e-6


def test_the_step_range_is_honoured_and_outside_it_nothing_extra_runs():
    model, x, cond, uncond = make("humo")
    sigmas = [9.5, 8.0, 6.0, 4.0, 2.0, 0.5]      # fractions 0.05 … 0.95 of ModelSampling above
    patched, hook = patch(model, w_a=2.0, start=0.1, end=0.5)      # σ in (5, 9]
    outs = []
    with torch.no_grad():
        for s in sigmas:
            outs.append(sampling_function(patched, x, torch.tensor([s]), uncond, cond, cfg=3.0))
    assert patched.calls == [4, 6, 6, 4, 4, 4] and hook.off_sync_calls == 2
    with torch.no_grad():
        for s, o in zip(sigmas, outs):
            if s not in (8.0, 6.0):
                assert torch.equal(o, sampling_function(model, x, torch.tensor([s]), uncond, cond, cfg=3.0))


def test_the_node_shows_the_model_audio_layers(monkeypatch):
    model, *_ = make("humo")
    real = compat.patch_audio_sync_guidance
    monkeypatch.setattr(compat, "patch_audio_sync_guidance", lambda m, settings: real(
        m, settings, calc_cond_batch=calc_cond_batch, apply_model_wrapper_type=APPLY_MODEL))
    out = AVSyncAudioSyncGuidanceModel().patch(model, 2.0, 0.0, 0.5, "1")
    assert out["ui"]["text"] == ["ASG w_a=2, steps 0-0.5 of sampling, skipping audio layers 1 on a model with "
                                 "2 audio layers (humo, in blocks 1, 2)"]
    assert out["result"][0].object_patches.keys() == {"diffusion_model.blocks.2.audio_cross_attn_wrapper.forward"}
