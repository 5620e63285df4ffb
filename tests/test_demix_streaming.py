"""Demixing a file in bounded memory: block-by-block decoding, overlap-add over
arriving blocks, stems written chunk by chunk under temporary names, the streamed
loudness for a model's gain, and the node's memory statement / refusal."""

import logging

import numpy as np
import pytest
import torch

from avsync.core import audio_io
from avsync.core.audio import make_audio
from avsync.core.errors import AudioFileError, InputError
from avsync.core.loudness import LoudnessMeter, integrated_loudness
from avsync.samplers.chunking import overlap_add_stream, run_overlap_add
from avsync.samplers.demix import demix, demix_blocks, demix_file

from tests.factories.audio_files import write_wav
from tests.factories.demix import known_mixture

STEMS = ("speech.wav", "effects.wav", "music.wav")


def _blocks(x, sizes):
    pos, k = 0, 0
    while pos < x.shape[-1]:
        n = sizes[k % len(sizes)]
        yield x[:, pos:pos + n]
        pos, k = pos + n, k + 1


@pytest.mark.parametrize("total,chunk,overlap", [(10007, 1000, 100), (10007, 1000, 500), (9000, 3000, 0),
                                                 (500, 20000, 10), (1001, 1000, 100), (1, 10, 5)])
def test_arriving_blocks_give_the_same_result_as_the_whole_signal(total, chunk, overlap):
    """Same chunks, same processor calls, same cross-fades as the one-tensor runner. Not
    bit-identical: a chunk here is a concatenation (contiguous), there a strided view,
    and a reduction over them (``mean``) may sum in another order (measured max abs
    difference 3.7e-9 with ATEN_CPU_CAPABILITY=default, 0 otherwise)."""
    x = torch.randn(2, total, generator=torch.Generator().manual_seed(total))

    def process(c):
        return torch.stack([c.flip(-1), c * c.mean()])   # depends on the whole chunk: wrong chunks would show

    whole = run_overlap_add(process, x, chunk, overlap, 2)
    parts = list(overlap_add_stream(process, _blocks(x, [37, 1024, 5, 999]), chunk, overlap, 2))
    assert [s for s, _ in parts] == sorted(s for s, _ in parts)
    assert float((torch.cat([b for _, b in parts], dim=-1) - whole).abs().max()) <= 1e-6


def test_dsp_over_blocks_equals_dsp_over_the_clip():
    mix = known_mixture(sr=8000, duration=4.0, stereo=True)["mixture"]
    whole = demix(mix, 8000, "dsp", chunk_seconds=1.5, overlap=0.25)
    parts = torch.cat([b for _, b in demix_blocks(_blocks(mix, [1024]), 8000, "dsp", chunk_seconds=1.5,
                                                  overlap=0.25)], dim=-1)
    # the same samples reach the same code; only memory layout (a view vs a concatenation) differs
    assert float((whole - parts).abs().max()) < 1e-6


def test_streamed_loudness_equals_the_one_tensor_loudness():
    """The model gain of a streamed file: block energies in segments with a warm-up lead,
    gated as BS.1770 says; measured difference to integrated_loudness: 0.0 LU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8000 * 40, generator=g) * torch.linspace(0.01, 0.5, 8000 * 40)
    x[:, 8000 * 10:8000 * 15] = 0
    ref = integrated_loudness(x, 8000)
    for segment in (13.0, 7.3):
        meter = LoudnessMeter(8000, segment_seconds=segment)
        for b in _blocks(x, [1024, 3001, 77]):
            meter.add(b)
        assert abs(meter.lufs() - ref) < 1e-9
    short = LoudnessMeter(8000)
    short.add(torch.ones(1, 100))
    assert short.lufs() == float("-inf")


def _write_mix(tmp_path, seconds=6.0, sr=16000, stereo=True):
    mix = known_mixture(sr=sr, duration=seconds, stereo=stereo)["mixture"].numpy()
    src = tmp_path / "mix.wav"
    write_wav(src, mix, sr, dtype="float32")
    return src, mix


def test_each_chunk_is_written_before_the_next_input_chunk_is_decoded(tmp_path, monkeypatch):
    """An instrumented decoder and writer: every time the decoder hands over a block,
    note how much it has handed over and how much of each stem has been written. A
    chunk's stems must be written before input past that chunk (plus one decoder
    block of look-ahead) is decoded: the output grows while input remains."""
    sr, chunk_s, overlap = 16000, 1.0, 0.25
    src, mix = _write_mix(tmp_path, seconds=6.0, sr=sr)
    events = []   # ("read", samples decoded so far) / ("write", samples written so far)
    written = [0]
    real_iter, real_write = audio_io.AudioStream.__iter__, audio_io.WavWriter.write

    def reading(self):
        pos = 0
        for block in real_iter(self):
            pos += block.shape[-1]
            events.append(("read", pos, block.shape[-1]))
            yield block

    def writing(self, samples):
        real_write(self, samples)
        if self.path.name == "music.wav":
            written[0] += samples.shape[-1]
            events.append(("write", written[0], samples.shape[-1]))

    monkeypatch.setattr(audio_io.AudioStream, "__iter__", reading)
    monkeypatch.setattr(audio_io.WavWriter, "write", writing)
    info = demix_file(src, tmp_path / "out", "dsp", chunk_seconds=chunk_s, overlap=overlap, bits=32)
    chunk, step = int(chunk_s * sr), int(chunk_s * sr) - int(overlap * chunk_s * sr)
    total = mix.shape[-1]
    assert info["samples"] == total and written[0] == total
    first_write = next(i for i, e in enumerate(events) if e[0] == "write")
    assert any(e[0] == "read" for e in events[first_write:])   # output grew while input remained
    largest_read = max(e[2] for e in events if e[0] == "read")
    out_so_far = 0
    for kind, pos, _ in events:
        if kind == "write":
            out_so_far = pos
        else:
            # input decoded past chunk k's end by more than one decoder block: chunk k is written
            k_done = (pos - largest_read - chunk) // step + 1 if pos - largest_read >= chunk else 0
            assert out_so_far >= min(total, k_done * step), (pos, out_so_far)
    stems = [audio_io.decode_audio_file(tmp_path / "out" / n) for n in STEMS]
    assert all(d.samples.shape == mix.shape and d.sample_rate == sr for d in stems)
    assert np.abs(sum(d.samples for d in stems) - mix).max() < 1e-5
    node = demix(torch.from_numpy(mix), sr, "dsp", chunk_seconds=chunk_s, overlap=overlap)
    assert np.abs(stems[1].samples - node[1].numpy()).max() < 1e-6   # the file holds the node's stems
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(STEMS)   # no temporary files left


def test_a_failure_midway_leaves_no_output_file(tmp_path, monkeypatch):
    src, _ = _write_mix(tmp_path)
    real_iter = audio_io.AudioStream.__iter__

    def failing(self):
        for k, block in enumerate(real_iter(self)):
            if k == 40:
                raise AudioFileError(self.path, "audio data cannot be decoded (simulated)")
            yield block

    monkeypatch.setattr(audio_io.AudioStream, "__iter__", failing)
    out = tmp_path / "out"
    out.mkdir()
    (out / "speech.wav").write_bytes(b"an older result")
    with pytest.raises(AudioFileError, match="simulated"):
        demix_file(src, out, "dsp", chunk_seconds=1.0)
    # stems had been written for the first chunks; all temporary files are gone, the older file untouched
    assert [p.name for p in out.iterdir()] == ["speech.wav"]
    assert (out / "speech.wav").read_bytes() == b"an older result"


def test_model_gain_of_a_streamed_file_is_the_whole_file_gain(tmp_path, monkeypatch):
    from avsync.samplers import demix as D

    src, mix = _write_mix(tmp_path, seconds=3.0)
    seen = []
    monkeypatch.setattr(D, "model_chunk_processor", lambda model, sr, gain: (seen.append(gain), lambda c: torch.stack(
        [c, 0 * c, 0 * c]))[1])

    class Fake:
        family = "fake"

        class managed:
            @staticmethod
            def offload():
                pass

    demix_file(src, tmp_path / "out", "model", Fake(), chunk_seconds=1.0)
    assert seen == [pytest.approx(D.input_gain(torch.from_numpy(mix), 16000), rel=1e-9)]


def test_node_refuses_before_work_when_the_stems_cannot_fit(monkeypatch, caplog):
    from avsync.cli.common import run_node
    from avsync.samplers import demix as D

    sr = 8000
    x = make_audio(torch.zeros(1, 1).expand(2, sr * 600), sr)   # 10 minutes of stereo, allocated as one sample
    need = D.memory_need(2, sr * 600, sr, 20.0, "dsp")
    assert need["stems"] == 3 * 2 * sr * 600 * 4 and need["chunk"] == 120 * 2 * 20 * sr
    assert need["total"] == 153_600_000
    monkeypatch.setattr(D, "available_memory_bytes", lambda: 100 * 2 ** 20)
    with pytest.raises(InputError, match=r"audio: demixing 1 x 600 s of 2-channel 8000 Hz audio \(dsp\) needs "
                                         r"about 0\.14 GB \(0\.11 GB for the three stems, 0\.04 GB for one 20 s "
                                         r"chunk\), more than the 0\.10 GB of memory available"):
        run_node("AVSyncDemixer", audio=x, method="dsp")
    # a long input that fits: the need is stated before the work starts
    monkeypatch.setattr(D, "available_memory_bytes", lambda: 64 * 2 ** 30)
    started = []
    monkeypatch.setattr(D, "run_overlap_add", lambda *a, **k: started.append(len(caplog.records)))
    with caplog.at_level(logging.INFO, logger="avsync"):
        run_node("AVSyncDemixer", audio=x, method="dsp")
    # the need is logged, and logged before the work starts (run_node logs the inputs first)
    needs = [i for i, r in enumerate(caplog.records) if "needs about 0.14 GB" in r.getMessage()]
    assert len(needs) == 1 and started == [needs[0] + 1]


def test_cli_bad_option_is_a_one_line_error_before_any_output(tmp_path, capsys):
    from avsync.cli import main

    src, _ = _write_mix(tmp_path, seconds=1.0, sr=8000)
    assert main(["demix", str(src), "--out", str(tmp_path / "o"), "--chunk-seconds", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--chunk-seconds: must be between 1 and 600, got 0.5" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
