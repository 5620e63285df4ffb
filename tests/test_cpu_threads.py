"""networks/cpu_threads.py: recurrences and batch items run in their own single-threaded
threads give the same numbers as the plain call, restore the caller's thread count,
keep its grad / inference mode and pass errors on."""

import pytest
import torch
from torch import nn

from avsync.networks.bandit_v2 import BanditV2, BanditV2Config
from avsync.networks.cpu_threads import rnn_plan, run_in_threads, run_items_in_threads, run_rnn


@pytest.mark.parametrize("kind, bidirectional, threads, layers",
                         [("GRU", True, 2, 1), ("LSTM", True, 2, 1), ("RNN", True, 2, 1), ("GRU", True, 4, 1),
                          ("GRU", False, 3, 1), ("GRU", True, 2, 2), ("LSTM", True, 4, 3)])
def test_run_rnn_matches_the_plain_call(kind, bidirectional, threads, layers):
    torch.manual_seed(0)
    # several layers: dropout between them is off in eval mode, so the layer-by-layer loop may run them
    rnn = getattr(nn, kind)(6, 5, num_layers=layers, dropout=0.1 if layers > 1 else 0.0, batch_first=True,
                            bidirectional=bidirectional).eval().requires_grad_(False)
    x = torch.randn(40, 17, 6)
    plan = rnn_plan(rnn, x, threads)
    # two directions, and with more threads slices of >= 16 rows (40 rows: at most 2 slices)
    assert len(plan) == {(True, 2): 2, (True, 4): 4, (False, 3): 2}[(bidirectional, threads)]
    with torch.inference_mode():
        ref = rnn(x)[0]
        y = run_rnn(rnn, x, threads=threads)
    assert y.shape == ref.shape
    # measured 0 (same kernels on the same rows; slices change matrix shapes: last bits at most)
    assert float((y - ref).abs().max()) <= 1e-6
    assert y.is_inference()


def test_run_rnn_falls_back_for_autograd_and_one_thread():
    rnn = nn.GRU(4, 3, batch_first=True, bidirectional=True)
    x = torch.randn(2, 5, 4)
    assert rnn_plan(rnn, x, 2) == []              # parameters require grad
    assert rnn_plan(rnn.requires_grad_(False), x, 1) == []
    stacked = nn.GRU(4, 3, num_layers=2, dropout=0.5, batch_first=True, bidirectional=True).requires_grad_(False)
    assert rnn_plan(stacked, x, 2) == []          # training mode: dropout between the layers
    assert len(rnn_plan(stacked.eval(), x, 2)) == 2
    y = run_rnn(rnn.requires_grad_(True), x, threads=2)
    y.sum().backward()
    assert rnn.weight_hh_l0_reverse.grad is not None


def test_run_in_threads_restores_threads_and_passes_errors():
    before = torch.get_num_threads()
    seen = run_in_threads([torch.get_num_threads, torch.is_grad_enabled], threads_each=1)
    assert seen == [1, True] and torch.get_num_threads() == before
    with torch.no_grad():
        assert run_in_threads([torch.is_grad_enabled]) == [False]

    def boom():
        raise ValueError("inside a worker")

    with pytest.raises(ValueError, match="inside a worker"):
        run_in_threads([lambda: 1, boom])
    assert torch.get_num_threads() == before


def test_items_in_threads_equal_one_batch():
    """A tiny BandIt v2 on 3 items: split over 2 threads as one batch on one thread."""
    torch.manual_seed(0)
    cfg = BanditV2Config(n_bands=8, n_sqm_modules=1, emb_dim=8, rnn_dim=8, mlp_dim=16, n_fft=256, hop_length=128,
                         sample_rate=4000)
    net = BanditV2(cfg).eval().requires_grad_(False)
    x = torch.randn(3, 1, 3000)
    with torch.inference_mode():
        ref = net.separate_items(x)
        y = run_items_in_threads(net.separate_items, x, net, threads=2)
    # measured 0 (batch shape differs: 2 + 1 items against 3; last bits at most)
    assert float((y - ref).abs().max()) <= 1e-5
    assert float(ref.abs().max()) > 0.1
