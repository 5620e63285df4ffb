"""MTV pipeline (samplers/mtv.py): the released window plan, the branch model's conditions, the
window hand-over, ASG on MTV. Reference: suimuc/MTV_Framework@5704fe6 ``mtv/sample_video.py``."""

from __future__ import annotations

import math

import pytest
import torch

from avsync.core.errors import InputError
from avsync.samplers.core.guidance import AUDIO, TEXT, Branch
from avsync.samplers.mtv import (
    OVERLAP_FRAMES, WINDOW_FRAMES, MTVBranchModel, MTVSettings, Window, window_features, window_plan)


def _padded(seconds: float) -> tuple[int, int]:
    """The release's audio_processor.py:preprocess: seq_len = ceil(s·24), padded up to 1 + 48k."""
    seq = math.ceil(seconds * 16000 / 16000 * 24)
    n = seq if (seq - 1) % 48 == 0 else seq + 48 - (seq - 1) % 48
    return seq, n


# -- window plan -------------------------------------------------------------------------

def test_ten_seconds_give_225_frames():
    seq, n = _padded(10.0)
    assert (seq, n) == (240, 241)
    plan = window_plan(n, seq)
    assert [w.start for w in plan.windows] == [0, 44, 88, 132, 176]       # times = (241 − 8)//44 = 5
    assert plan.rendered == 5 + 44 * 5 == 225 and plan.frames == 225
    assert plan.unrendered == (225, 240) and plan.unrendered_features == 16
    assert [w.keep for w in plan.windows] == [0, 5, 5, 5, 5]
    assert [w.handover for w in plan.windows] == [None, 44, 44, 44, 44]
    assert [w.clean_frames for w in plan.windows] == [0, 2, 2, 2, 2]
    assert "225-239" in plan.describe()


@pytest.mark.parametrize("n", [1 + 48 * k for k in range(1, 40)])
def test_released_plan_formula(n):
    times = max((n - 8) // 44, 1)
    plan = window_plan(n)
    assert len(plan.windows) == times
    assert all(w.start == 44 * w.index and w.end == 44 * w.index + 49 for w in plan.windows)
    assert plan.rendered == 5 + 44 * times
    # 3 to 46 trailing feature frames are never rendered (reference notes §1.5) — except for
    # N = 49 (≤ 2 s of speech), where the one forced window covers all 49
    assert 3 <= n - plan.rendered <= 46 if n > 49 else plan.rendered == n
    # the windows tile the rendered frames without gaps or overlaps
    spans = [w.video_frames for w in plan.windows]
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("n", [1 + 48 * k for k in range(1, 40)])
def test_render_tail_covers_the_speech(n):
    plan = window_plan(n, render_tail=True)
    released = window_plan(n)
    assert plan.rendered >= n and plan.frames == n
    assert plan.windows[: len(released.windows)] == released.windows
    if len(plan.windows) > len(released.windows):
        tail, prev = plan.windows[-1], plan.windows[-2]
        assert tail.tail and tail.start == min(n - 49, 44 * len(released.windows))
        # the 5 hand-over frames lie inside the previous window, and the kept frames continue it
        assert 0 < tail.handover and tail.handover + OVERLAP_FRAMES <= WINDOW_FRAMES
        assert tail.start == prev.start + tail.handover
        assert tail.video_frames[0] == prev.end and tail.keep >= OVERLAP_FRAMES


def test_render_tail_adds_nothing_when_released_windows_reach_the_end():
    assert len(window_plan(241, 225, render_tail=True).windows) == 5
    assert len(window_plan(49, 40, render_tail=True).windows) == 1


def test_short_and_limited_plans():
    plan = window_plan(1, 1)                # 1/24 s: one zero-padded window, cut to 1 frame
    assert len(plan.windows) == 1 and plan.frames == 1
    plan = window_plan(481, 470, max_windows=2)
    assert len(plan.windows) == 2 and plan.frames == 93
    with pytest.raises(InputError, match="speech"):
        window_plan(0)


def test_window_features_slice_and_zero_pad():
    feats = torch.arange(60, dtype=torch.float32).view(60, 1, 1, 1).expand(60, 5, 2, 3)
    w = window_features(feats, Window(1, 44, 44, 5))
    assert w.shape == (1, 49, 5, 2, 3)
    assert torch.equal(w[0, :16, 0, 0, 0], torch.arange(44, 60, dtype=torch.float32))
    assert torch.count_nonzero(w[0, 16:]) == 0       # past the end: zeros, as released (pre_fix of zeros_like)


def test_settings_are_checked():
    with pytest.raises(InputError, match="windows"):
        MTVSettings(windows="tail").validate()
    with pytest.raises(InputError, match="steps"):
        MTVSettings(steps=0).validate()
    with pytest.raises(InputError, match="cfg"):
        MTVSettings(cfg=float("nan")).validate()


# -- branch model ---------------------------------------------------------------------

class _Recorder(torch.nn.Module):
    """Records what the network is called with; answers with the latents' first 16 channels."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, latents, text, timestep, speech, effects, music, speech2=None, clean_frames=0):
        self.calls.append(dict(latents=latents, text=text, timestep=timestep, speech=speech, effects=effects,
                               music=music, speech2=speech2, clean_frames=clean_frames))
        return latents[:, :, :16] * 2


def test_branch_model_conditions_and_zero_channels():
    torch.manual_seed(0)
    net = _Recorder()
    text = torch.randn(1, 226, 8)
    audio = {k: torch.randn(1, 49, 5, 2, 3) for k in ("speech", "effects", "music")}
    family = MTVBranchModel(net, text, audio, clean_frames=2)
    uncond, cond = family.inputs(Branch("uncond")), family.inputs(Branch("cond", frozenset({TEXT, AUDIO})))
    assert torch.equal(cond["text"], text) and all(torch.equal(cond[k], audio[k]) for k in audio)
    assert torch.count_nonzero(uncond["text"]) == 0 and all(torch.count_nonzero(uncond[k]) == 0 for k in audio)
    x = torch.randn(2, 13, 16, 4, 6)
    out = family(x, torch.tensor(999.0), {k: torch.cat([uncond[k], cond[k]]) for k in cond})
    call = net.calls[-1]
    assert call["latents"].shape == (2, 13, 32, 4, 6)
    assert torch.equal(call["latents"][:, :, :16], x) and torch.count_nonzero(call["latents"][:, :, 16:]) == 0
    assert call["timestep"].tolist() == [999.0, 999.0] and call["clean_frames"] == 2
    assert call["speech2"] is None and torch.equal(out, x * 2)
