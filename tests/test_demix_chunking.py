"""The chunked overlap-add runner: exact reconstruction, one progress step per
chunk, cancellation, and bounded working memory on a 10-minute input."""

import pytest
import torch

from avsync import compat
from avsync.samplers.chunking import ChunkPlan, crossfade_weights, run_overlap_add


def _two_outputs(x):
    return torch.stack([x, -2.0 * x])


@pytest.mark.parametrize("total,chunk,overlap", [(10007, 1000, 100), (10007, 1000, 500), (9000, 3000, 0),
                                                 (500, 20000, 10), (10007, 999, 333), (1, 10, 5)])
def test_identity_processor_reconstructs_exactly(total, chunk, overlap):
    x = torch.randn(2, total)
    y = run_overlap_add(_two_outputs, x, chunk, overlap, 2)
    assert torch.allclose(y[0], x, atol=1e-6) and torch.allclose(y[1], -2.0 * x, atol=1e-6)
    blocks = []
    assert run_overlap_add(_two_outputs, x, chunk, overlap, 2, sink=lambda s, b: blocks.append((s, b))) is None
    starts = [s for s, _ in blocks]
    assert starts == sorted(starts) and starts[0] == 0
    assert torch.equal(torch.cat([b for _, b in blocks], dim=-1), y)


def test_plan_only_neighbours_overlap_and_weights_sum_to_one():
    plan = ChunkPlan.make(10_000, 1000, 900)   # overlap is capped at half a chunk
    assert plan.overlap == 500 and plan.step == 500
    spans = list(plan.bounds())
    assert spans[0] == (0, 1000) and spans[-1][1] == 10_000 and len(spans) == plan.num_chunks
    total = torch.zeros(10_000, dtype=torch.float64)
    for k, (a, b) in enumerate(spans):
        assert b - a > plan.overlap
        if k >= 2:
            assert spans[k - 2][1] <= a  # never three chunks on one sample
        prev_end = spans[k - 1][1] if k else None
        nxt = spans[k + 1][0] if k + 1 < len(spans) else None
        total[a:b] += crossfade_weights(a, b, prev_end, nxt)
    assert torch.allclose(total, torch.ones_like(total))
    # hand-checked ramp: overlap of 4 samples -> 1/8, 3/8, 5/8, 7/8 up
    w = crossfade_weights(6, 12, 10, None)
    assert w.tolist() == [0.125, 0.375, 0.625, 0.875, 1.0, 1.0]


def test_one_progress_step_per_chunk_and_cancel(monkeypatch):
    seen = []
    compat.set_default_progress_callback(lambda v, t: seen.append((v, t)))
    try:
        run_overlap_add(_two_outputs, torch.randn(1, 5000), 1000, 100, 2)
        assert seen == [(k, 6) for k in range(1, 7)]
        compat.request_interrupt()
        with pytest.raises(compat.Interrupted):
            run_overlap_add(_two_outputs, torch.randn(1, 5000), 1000, 100, 2)
    finally:
        compat.set_default_progress_callback(None)
        compat.request_interrupt(False)


def test_ten_minute_input_runs_in_bounded_chunks():
    """10 minutes of 48 kHz stereo, streamed to a sink: the processor never sees more
    than one chunk and nothing holds more than one chunk of output at a time. (The
    input is a broadcast view, so the test itself allocates almost nothing.)"""
    sr, chunk = 48000, 20 * 48000
    total = 600 * sr
    x = torch.ones(2, 1).expand(2, total)  # 10 min at 48 kHz stereo
    longest = [0]
    received = [0]
    largest_block = [0]

    def process(c):
        longest[0] = max(longest[0], c.shape[-1])
        return c.unsqueeze(0)

    def sink(start, block):
        assert start == received[0]
        received[0] += block.shape[-1]
        largest_block[0] = max(largest_block[0], block.shape[-1])
        assert float((block[..., ::997] - 1.0).abs().max()) < 1e-6  # cross-fades sum to one

    run_overlap_add(process, x, chunk, chunk // 10, 1, sink=sink)
    assert received[0] == total
    assert longest[0] == chunk and largest_block[0] <= chunk


def test_processor_with_wrong_shape_is_reported():
    with pytest.raises(RuntimeError, match="expected"):
        run_overlap_add(lambda c: c, torch.randn(1, 100), 50, 10, 3)


def test_segmented_loudness_equals_torchaudio():
    """The MRX input gain needs BS.1770 loudness of the whole clip; ours K-weights it in
    segments (bounded memory) and must give torchaudio's number."""
    AF = pytest.importorskip("torchaudio.functional")

    from avsync.core.loudness import integrated_loudness

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16000 * 130, generator=g) * torch.linspace(0.01, 0.5, 16000 * 130)
    x[:, 16000 * 30:16000 * 40] = 0  # a silent stretch: the gates matter
    assert abs(integrated_loudness(x, 16000) - float(AF.loudness(x.double(), 16000))) < 1e-6
    assert integrated_loudness(torch.zeros(1, 16000), 16000) == float("-inf")
    assert integrated_loudness(torch.ones(1, 100), 16000) == float("-inf")
