"""A models folder with tiny random-weight KeyVID files in the CONVERTED layout the loader nodes read.

:func:`write_tiny_keyvid_models` builds the tiny released-style checkpoints of
``tests/factories/keyvid.py`` (generator, interpolator, ``imagebind_huge.pth``), runs the real
converter (``loaders/keyvid.py:convert_checkpoints``) into ``<models>/avsync/keyvid`` and writes a
tiny CLIP BPE vocabulary into ``<models>/avsync/keyvid/tokenizer/`` (where
``loaders/keyvid.py:openclip_tokenizer`` looks outside ComfyUI). So the files are found, checked and
loaded by the same code as converted real weights; only the sizes and the weights are not real.

The tiny text tower has CLIP's 49 408-token embedding (at a width of 64) so that every id of the
real vocabulary fits: inside ComfyUI the prompt is tokenized with ComfyUI's own copy of the real
vocabulary (``comfy/sd1_tokenizer``), outside it with the tiny one written here.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from . import keyvid as fk

CLIP_VOCAB_SIZE = 49408            # <|startoftext|> = 49406, <|endoftext|> = 49407
# widths that meet where the real model's do, so the whole pipeline runs: text width = context_dim (64),
# a 48-frame image Resampler (keyframe indices up to 47), 768-wide ImageBind audio tokens, an 8x VAE; the text
# embedding holds every id of CLIP's vocabulary
TINY_SIZES = fk.Sizes(unet=dict(fk.TINY_UNET, context_dim=64),
                      image_proj=dict(fk.TINY_IMAGE_PROJ, video_length=48, output_dim=64),
                      text=dict(fk.TEXT, vocab=CLIP_VOCAB_SIZE), audio=dict(width=768, layers=1),
                      # the released VAE's 8x downsampling (4 levels), so 64 px frames are 8 x 8 latents
                      vae={"embed_dim": 4, "ddconfig": dict(fk.TINY_VAE["ddconfig"], ch_mult=[1, 1, 1, 1])})


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte → printable character table (``simple_tokenizer.py:bytes_to_unicode``), in its order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip_vocab(folder) -> Path:
    """A CLIP BPE vocabulary without merges: the 256 byte symbols (ids 0..255, ``!`` = 0 as in CLIP),
    the same with ``</w>`` (256..511) and the two special tokens at CLIP's ids 49406 / 49407. Every
    prompt tokenizes (byte by byte) with the real tokenizer code."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def write_tiny_keyvid_models(models_dir, dtype: str = "fp32", seed: int = 0, tokenizer: bool = True) -> dict:
    """Tiny converted KeyVID generator + interpolator files in ``<models_dir>/avsync/keyvid``.

    Returns ``{"folder", "generator", "interpolator", "tokenizer"}`` (paths). Existing identical
    files are kept (the converter compares them), so calling it twice is cheap to reason about."""

    from avsync.loaders import keyvid

    out = Path(models_dir) / "avsync" / "keyvid"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="avsync-tiny-keyvid-") as tmp:
        tmp = Path(tmp)
        huge = fk.tiny_imagebind_huge(sizes=TINY_SIZES)
        gen = fk.save_tiny_ckpt(tmp / "generator_checkpoint.ckpt", "generator",
                                fk.tiny_state_dict("generator", seed=seed, imagebind_huge=huge, sizes=TINY_SIZES))
        interp = fk.save_tiny_ckpt(tmp / "epoch=3669-step=58720.ckpt", "interpolator",
                                   fk.tiny_state_dict("interpolator", seed=seed + 5, imagebind_huge=huge,
                                                      sizes=TINY_SIZES))
        ib = fk.save_tiny_imagebind_huge(tmp / "imagebind_huge.pth", huge)
        configs = {r: keyvid.read_config_file(p) for r, p in fk.write_tiny_configs(tmp / "configs", TINY_SIZES).items()}
        keyvid.convert_checkpoints([gen, interp], out, dtype=dtype, imagebind=ib, configs=configs,
                                   log=lambda s: None, overwrite=True)
    tok = write_tiny_clip_vocab(out / "tokenizer") if tokenizer else None
    return {"folder": out, "generator": out / keyvid.DEFAULT_FILENAMES[("generator", "unet")],
            "interpolator": out / keyvid.DEFAULT_FILENAMES[("interpolator", "unet")], "tokenizer": tok}
