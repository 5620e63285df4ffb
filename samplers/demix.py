"""Run a demixer (the ``dsp`` separator or a neural model) over a whole clip, chunk
by chunk: ``[C, T]`` at any rate in, ``[3, C, T]`` stems (speech, effects, music) at
the same rate, length and channel count out."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from ..core.audio import resample
from ..core.demix_dsp import STEMS, demix_dsp
from ..core.loudness import LoudnessMeter, integrated_loudness
from .bandit_chunking import bandit_overlap_add_stream, run_bandit_overlap_add
from .chunking import overlap_add_stream, run_overlap_add

METHODS = ("auto", "dsp", "model", "bandit_v2", "learned")
MODEL_FAMILIES = ("bandit_v2",)           # methods that name the family of the connected model
MODEL_METHODS = ("model",) + MODEL_FAMILIES
# BandIt v2 at the released size: 734 and 792 MB of working memory above the loaded model for one 8 s
# mono chunk at 48 kHz in two runs (384,000 samples; bench/bench_demix.py --bandit) = up to 2063 B (a
# stereo chunk, its two channels in parallel threads: 1038-1129 MB = up to 1470 B per sample and channel);
# rounded up. It was 576 MB when the two directions of each GRU ran one after the other.
BANDIT_CHUNK_BYTES_PER_SAMPLE = 2200
# The learned method (dsp, then the network on dsp's stems): 187 MB and 342 MB above the loaded network
# for 10 s and 20 s chunks of 44.1 kHz stereo (222 and 203 B per sample and channel: dsp's working set,
# three more STFTs for the guide, grid features, GRU states, masks, stems); rounded up.
LEARNED_CHUNK_BYTES_PER_SAMPLE = 260
REFERENCE_LUFS = -27.0   # the reference separate.py brings input to DnR's average loudness
# Peak working memory of one dsp chunk per input sample and channel (STFT, magnitudes,
# masks, three stems): measured with bench/bench_demix.py, ~184 MB for 20 s of 44.1 kHz
# stereo = 104 B; rounded up. The MRX networks need more per chunk (three STFTs, BLSTM
# states), so a model chunk counts three times as much. BandIt v2 runs at 48 kHz whatever
# the input rate, so its figure is per sample at 48 kHz of its fixed 8 s chunk.
CHUNK_BYTES_PER_SAMPLE = {"dsp": 120, "model": 360, "bandit_v2": BANDIT_CHUNK_BYTES_PER_SAMPLE,
                          "learned": LEARNED_CHUNK_BYTES_PER_SAMPLE}


def memory_need(channels: int, samples: int, sample_rate: int, chunk_seconds: float, method: str,
                clips: int = 1) -> dict:
    """Bytes the node needs beyond its input for ``clips`` clips of ``[channels, samples]``:
    the three full-length float32 stems it returns and one chunk's working set.
    ``method``: ``dsp``, ``learned``, ``model`` (MRX) or ``bandit_v2`` (``chunk_seconds`` its own 8 s)."""
    kind = method if method in CHUNK_BYTES_PER_SAMPLE else "model"
    rate = 48000 if kind == "bandit_v2" else sample_rate
    chunk = int(round(chunk_seconds * rate)) if kind == "bandit_v2" else min(samples, int(round(chunk_seconds * rate)))
    stems = 3 * clips * channels * samples * 4
    work = CHUNK_BYTES_PER_SAMPLE[kind] * channels * chunk
    return {"stems": stems, "chunk": work, "total": stems + work}


def available_memory_bytes() -> Optional[int]:
    """Memory the process can still take: ComfyUI's figure for the CPU when inside
    ComfyUI, else the kernel's ``MemAvailable``; None when unknown."""
    from .. import compat

    free = compat.free_memory_bytes(torch.device("cpu"))
    if free is not None:
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def input_gain(waveform: torch.Tensor, sample_rate: int, target_lufs: float = REFERENCE_LUFS) -> float:
    """Gain that brings the clip's integrated loudness (ITU-R BS.1770) to ``target_lufs``,
    as the reference ``separate.py`` does with pyloudnorm; 1.0 when loudness is
    undefined (shorter than one 400 ms gating block, or silent)."""
    lufs = integrated_loudness(waveform, int(sample_rate))
    if not math.isfinite(lufs):
        return 1.0
    return float(10.0 ** ((target_lufs - lufs) / 20.0))


def _fit(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[-1] >= n:
        return x[..., :n]
    return torch.nn.functional.pad(x, (0, n - x.shape[-1]))


def model_chunk_processor(model, sample_rate: int, gain: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[C, L]`` at ``sample_rate`` → ``[3, C, L]`` stems through a loaded neural model:
    gain, resample to the model's rate, pad to its minimum length, run, undo all three."""
    order = [model.stem_index(s) for s in STEMS]

    def process(chunk: torch.Tensor) -> torch.Tensor:
        net = model.managed.load()
        device = next(net.parameters()).device
        length = chunk.shape[-1]
        x = resample(chunk * gain, sample_rate, model.sample_rate)
        n = x.shape[-1]
        x = _fit(x, max(n, model.min_length))
        with torch.inference_mode():
            y = net(x.unsqueeze(0).to(device))[0].float().cpu()
        y = _fit(resample(y[..., :n].contiguous(), model.sample_rate, sample_rate), length) / gain
        return y[order]

    return process


def uses_model(method: str, model) -> bool:
    return method in MODEL_METHODS or (method == "auto" and model is not None)


def weights_free_method(method: str) -> str:
    """What runs when no demix model does: ``learned`` (the shipped network) or ``dsp``
    (``dsp`` itself, and ``auto`` without a model)."""
    return "learned" if method == "learned" else "dsp"


def _chunk_processor(method: str, model, sample_rate: int, gain: Callable[[], float]):
    """``(process, desc, use_model)`` for :func:`demix` and :func:`demix_blocks`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    use_model = uses_model(method, model)
    if use_model and model is None:
        raise ValueError(f"method '{method}' needs a demix model")
    if method in MODEL_FAMILIES and model.family != method:
        raise ValueError(f"method '{method}' needs a {method} demix model, got a {model.family} model")
    if use_model:
        g = gain() if getattr(model, "loudness_normalize", True) else 1.0
        return model_chunk_processor(model, sample_rate, g), f"demix ({model.family})", True

    if method == "learned":
        return learned_chunk_processor(sample_rate), "demix (learned)", False

    def process(c: torch.Tensor) -> torch.Tensor:
        return demix_dsp(c, sample_rate)
    return process, "demix (dsp)", False


def learned_chunk_processor(sample_rate: int, net=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[C, L]`` → ``[3, C, L]`` through the network of the ``learned`` method (``net``:
    a loaded :class:`~avsync.networks.small_demixer.SmallDemixer`; default the shipped one.
    On the CPU: it is small, and its GRU runs each direction on its own thread,
    :mod:`avsync.networks.cpu_threads`)."""
    from ..loaders.demix import load_small_demixer
    from ..networks.small_demixer import separate

    net = net if net is not None else load_small_demixer()

    def process(chunk: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return separate(net, chunk.cpu(), sample_rate)
    return process


def _chunk_sizes(sample_rate: int, chunk_seconds: float, overlap: float) -> tuple[int, int]:
    chunk = max(1, int(round(chunk_seconds * sample_rate)))
    return chunk, int(round(min(max(overlap, 0.0), 0.5) * chunk))


def _own_chunking(model, sample_rate: int) -> Optional[tuple[int, int, int]]:
    """``(chunk, hop, batch)`` (samples at ``sample_rate``, chunks per call) for a model that brings its own
    chunker (BandIt v2: 8 s chunks on a 1 s hop, Hann-weighted, :mod:`.bandit_chunking`;
    ``chunk_seconds`` / ``overlap`` do not apply to it); None for AVSync's cross-faded
    chunks (:mod:`.chunking`)."""
    plan = getattr(model, "chunking", None) if model is not None else None
    if plan is None or plan.get("kind") != "bandit":
        return None
    return (int(plan["chunk_seconds"] * sample_rate), int(plan["hop_seconds"] * sample_rate),
            int(plan.get("batch", 1)))


def demix_stream(process, blocks, sample_rate: int, model, chunk_seconds: float, overlap: float, desc: str,
                 expected_total: Optional[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """The family's chunker over input blocks (see :func:`_own_chunking`)."""
    own = _own_chunking(model, sample_rate)
    if own is not None:
        yield from bandit_overlap_add_stream(process, blocks, own[0], own[1], len(STEMS), desc=desc,
                                             expected_total=expected_total, batch=own[2])
        return
    chunk, ov = _chunk_sizes(sample_rate, chunk_seconds, overlap)
    yield from overlap_add_stream(process, blocks, chunk, ov, len(STEMS), desc=desc, expected_total=expected_total)


def demix(waveform: torch.Tensor, sample_rate: int, method: str = "auto", model=None,
          chunk_seconds: float = 20.0, overlap: float = 0.1,
          sink: Optional[Callable[[int, torch.Tensor], None]] = None,
          out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Split ``[C, T]`` into ``[3, C, T]`` in :data:`STEMS` order.

    ``method``: ``dsp`` (no weights), ``model`` (``model`` is required), ``bandit_v2``
    (``model`` is required and must be a BandIt v2 model) or ``auto`` (the model when
    given, else dsp). Chunks of ``chunk_seconds`` overlap by ``overlap`` of a chunk and
    are cross-faded; a BandIt v2 model brings its own chunking instead (:func:`_own_chunking`). With ``sink`` the stems are handed over
    block by block (see :func:`~.chunking.run_overlap_add`) and nothing is returned;
    ``out`` (``[3, C, T]``) receives the stems instead of a new tensor.
    """
    x = waveform.to(torch.float32)
    process, desc, use_model = _chunk_processor(method, model, sample_rate, lambda: input_gain(x, sample_rate))
    own = _own_chunking(model if use_model else None, sample_rate)
    try:
        if own is not None:
            return run_bandit_overlap_add(process, x, own[0], own[1], len(STEMS), desc=desc, sink=sink, out=out,
                                          batch=own[2])
        chunk, ov = _chunk_sizes(sample_rate, chunk_seconds, overlap)
        return run_overlap_add(process, x, chunk, ov, len(STEMS), desc=desc, sink=sink, out=out)
    finally:
        if use_model:
            model.managed.offload()


def demix_blocks(blocks: Iterable[torch.Tensor], sample_rate: int, method: str = "auto", model=None,
                 chunk_seconds: float = 20.0, overlap: float = 0.1, gain: float = 1.0,
                 expected_total: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`demix` of a signal that arrives block by block: yields finished stem blocks
    ``(start, [3, C, n])`` in order, each before more than one input block past its
    chunk is pulled (:func:`~.chunking.overlap_add_stream`). Same chunks, same result
    as :func:`demix` on the whole signal. A model's input ``gain`` must come from the
    whole signal (:func:`input_gain`, or a :class:`~avsync.core.loudness.LoudnessMeter`
    pass over it), as the reference normalises the whole file's loudness."""
    process, desc, use_model = _chunk_processor(method, model, sample_rate, lambda: gain)
    try:
        yield from demix_stream(process, (b.to(torch.float32) for b in blocks), sample_rate,
                                model if use_model else None, chunk_seconds, overlap, desc, expected_total)
    finally:
        if use_model:
            model.managed.offload()


def gain_of_file(open_stream: Callable[[], Iterable], sample_rate: int) -> float:
    """:func:`input_gain` of a whole file, from one decoding pass in bounded memory."""
    meter = LoudnessMeter(sample_rate)
    for block in open_stream():
        meter.add(torch.from_numpy(block))
    lufs = meter.lufs()
    return 1.0 if not math.isfinite(lufs) else float(10.0 ** ((REFERENCE_LUFS - lufs) / 20.0))


def demix_file(path: str | Path, out_dir: str | Path, method: str = "auto", model=None,
               chunk_seconds: float = 20.0, overlap: float = 0.1, bits: int = 16,
               max_seconds: float = 3600.0, stem_files: tuple = ("speech.wav", "effects.wav", "music.wav"),
               start: float = 0.0, duration: float = 0.0, channel_mode: str = "keep") -> dict:
    """Demix an audio file into WAV files in ``out_dir`` (``stem_files``, in :data:`STEMS`
    order) in memory that does not grow with the file's length: the input is decoded
    block by block and each chunk's stems are written before the next input chunk is
    decoded. Files are written under temporary names and renamed only when all three
    are complete; on any error nothing is left in ``out_dir``. A model's input gain
    takes one extra decoding pass (the loudness of the whole file). ``start`` /
    ``duration`` pick a segment and ``channel_mode`` (``keep`` / ``mono`` / ``stereo``)
    mixes each block as the audio loader would (a per-sample mix, so block by block
    is exact); there is no resampling here: stems come out at the file's rate.
    Returns ``{"sample_rate", "channels", "samples", "paths"}``."""
    from ..core.audio import to_channels
    from ..core.audio_io import AudioStream, WavWriter

    path = Path(path)

    def open_stream():
        return AudioStream(path, start=start, duration=duration, max_seconds=max_seconds)

    def mixed(stream):
        for block in stream:
            yield to_channels(torch.from_numpy(block), channel_mode)

    use_model = uses_model(method, model)
    with open_stream() as probe:   # fail on a bad file before any work
        sr = probe.sample_rate
        expected = probe.expected_samples
    gain = 1.0
    if use_model and model is not None and getattr(model, "loudness_normalize", True):
        def decode():
            with open_stream() as s:
                yield from (b.numpy() for b in mixed(s))
        gain = gain_of_file(decode, sr)
    writers: list = []
    total = 0
    channels = 0
    try:
        with open_stream() as stream:
            blocks = mixed(stream)
            for start, stems in demix_blocks(blocks, sr, method, model, chunk_seconds, overlap, gain, expected):
                if not writers:
                    channels = stems.shape[1]
                    writers = [WavWriter(Path(out_dir) / name, sr, channels, bits) for name in stem_files]
                for writer, stem in zip(writers, stems):
                    writer.write(stem.numpy())
                total = start + stems.shape[-1]
        for w in writers:
            w.finish()   # all three complete before any is renamed
        paths = [w.commit() for w in writers]
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return {"sample_rate": sr, "channels": channels, "samples": total, "paths": paths}
