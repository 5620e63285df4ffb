"""Every file AVSyncMTVLoader reads, tiny and random, in the real layouts and folders: the transformer
converted by ``avsync convert mtv``'s code from a SAT/DeepSpeed checkpoint, a diffusers CogVideoX VAE
folder, a transformers T5 folder with its tokenizer beside it, a wav2vec2 folder. Used by
tests/test_mtv_nodes.py and ``tools/comfyui_e2e.py --tiny-models`` (tools/e2e/mtv_tiny_models.json).

The network is tests/test_mtv_pipeline.py's ``SMALL`` size: 3 latent frames of 4 × 6 (9-frame windows
of 32 × 48 px), the tiny encoders' widths (T5 d_model 32, wav2vec2 2 layers × 32)."""

from __future__ import annotations

from pathlib import Path

SMALL = dict(latent_frames=3, latent_height=4, latent_width=6, audio_window_frames=9, text_dim=32, text_tokens=226,
             audio_dim=32, audio_layers_per_frame=2, dual_heads=4, dual_mlp_dim=64)
# sizes the converter cannot read off the tensors (the latent grid, the wav2vec layer count, heads)
HIDDEN = {k: SMALL[k] for k in ("latent_frames", "latent_height", "latent_width", "audio_window_frames",
                                "audio_layers_per_frame", "dual_heads", "text_tokens")}
NAMES = dict(transformer="mtv_single_bf16.safetensors", vae="avsync_tiny_mtv_vae", t5="avsync_tiny_t5",
             wav2vec="wav2vec2-base-960h")   # the default name: the e2e workflow validates against the loader list


def write_tiny_mtv_models(models, scratch=None, seed: int = 0) -> dict:
    """Write the files under the ComfyUI-style ``models`` folder; returns the loader's widget values
    (``NAMES``). ``scratch``: where the SAT checkpoint is written before conversion (default beside)."""
    from avsync.loaders.mtv import convert_sat_checkpoint
    from tests.factories.mtv import tiny_mtv_config
    from tests.factories.mtv_encoder_files import (write_tiny_cogvideox_vae, write_tiny_t5, write_tiny_t5_tokenizer,
                                                   write_tiny_wav2vec_folder)
    from tests.factories.mtv_files import sat_state_dict, save_sat_checkpoint

    models = Path(models)
    scratch = Path(scratch) if scratch is not None else models.parent / "avsync_tiny_mtv_release"
    mtv = models / "avsync" / "mtv"
    mtv.mkdir(parents=True, exist_ok=True)
    save_sat_checkpoint(sat_state_dict(tiny_mtv_config(**SMALL), seed=seed), scratch / "single")
    convert_sat_checkpoint(scratch / "single", mtv / NAMES["transformer"], "bf16", variant="single",
                           config_overrides=dict(HIDDEN), hash_source=False)
    write_tiny_cogvideox_vae(mtv / NAMES["vae"], seed=seed + 1)
    write_tiny_t5(models / "text_encoders" / NAMES["t5"], seed=seed + 2)
    write_tiny_t5_tokenizer(models / "text_encoders" / NAMES["t5"] / "tokenizer")
    write_tiny_wav2vec_folder(models / "audio_encoders" / NAMES["wav2vec"], seed=seed + 3)
    return dict(NAMES)
