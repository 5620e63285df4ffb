"""Tiny MTV checkpoints in the released on-disk layouts, with random weights.

:func:`sat_state_dict` writes the SAT key names by hand from the SAT modules (reference notes
§2.4: ``dit_video_concat.py`` mixins, ``sat/model/transformer.py`` layers), independently of the
diffusers renaming, so that the converter's renaming is checked against diffusers' own module
(``CogVideoXTransformer3DModel``) rather than against itself. The audio keys are the network's
(``audio.*`` state-dict keys = SAT keys minus ``model.diffusion_model.transformer.``, as
mtv-net's parity test checks against the released code).

:func:`save_sat_checkpoint` saves a state dict the way SAT + DeepSpeed do
(``sat/training/model_io.py:save_ds_checkpoint`` → DeepSpeed ``engine._save_checkpoint``): the
module dict under ``"module"``, DeepSpeed's bookkeeping (``torch.Size`` parameter shapes, a
set, the ds config), and the python / numpy / torch RNG states; ``latest`` names the
iteration folder.
"""

from __future__ import annotations

import collections
import random
from pathlib import Path

import numpy as np
import torch

SAT = "model.diffusion_model."


def sat_backbone_shapes(cfg) -> dict[str, tuple]:
    """SAT names and shapes of the CogVideoX-5B (I2V) backbone for ``cfg`` (an MTVConfig)."""
    h, t, p = cfg.hidden, cfg.time_embed_dim, cfg.patch_size
    grid = cfg.latent_frames * (cfg.latent_height // p) * (cfg.latent_width // p)
    out = {
        "time_embed.0.weight": (t, h), "time_embed.0.bias": (t,), "time_embed.2.weight": (t, t), "time_embed.2.bias": (t,),
        "mixins.pos_embed.pos_embedding": (1, cfg.text_tokens + grid, h),
        "mixins.pos_embed.freqs_sin": (grid, cfg.head_dim), "mixins.pos_embed.freqs_cos": (grid, cfg.head_dim),
        "mixins.patch_embed.proj.weight": (h, cfg.in_channels, p, p), "mixins.patch_embed.proj.bias": (h,),
        "mixins.patch_embed.text_proj.weight": (h, cfg.text_dim), "mixins.patch_embed.text_proj.bias": (h,),
        "mixins.final_layer.norm_final.weight": (h,), "mixins.final_layer.norm_final.bias": (h,),
        "mixins.final_layer.linear.weight": (p * p * cfg.out_channels, h),
        "mixins.final_layer.linear.bias": (p * p * cfg.out_channels,),
        "mixins.final_layer.adaLN_modulation.1.weight": (2 * h, t),
        "mixins.final_layer.adaLN_modulation.1.bias": (2 * h,),
        "transformer.final_layernorm.weight": (h,), "transformer.final_layernorm.bias": (h,),
        "transformer.position_embeddings.weight": (64, h),
    }
    for i in range(cfg.num_layers):
        out[f"mixins.adaln_layer.adaLN_modulations.{i}.1.weight"] = (12 * h, t)
        out[f"mixins.adaln_layer.adaLN_modulations.{i}.1.bias"] = (12 * h,)
        for which in ("query", "key"):
            out[f"mixins.adaln_layer.{which}_layernorm_list.{i}.weight"] = (cfg.head_dim,)
            out[f"mixins.adaln_layer.{which}_layernorm_list.{i}.bias"] = (cfg.head_dim,)
        b = f"transformer.layers.{i}."
        for name, shape in (("input_layernorm", (h,)), ("post_attention_layernorm", (h,))):
            out[b + name + ".weight"], out[b + name + ".bias"] = shape, shape
        for name, (o, n) in (("attention.query_key_value", (3 * h, h)), ("attention.dense", (h, h)),
                             ("mlp.dense_h_to_4h", (4 * h, h)), ("mlp.dense_4h_to_h", (h, 4 * h))):
            out[b + name + ".weight"], out[b + name + ".bias"] = (o, n), (o,)
    return out


def sat_audio_shapes(cfg) -> dict[str, tuple]:
    """SAT names (minus ``transformer.``) and shapes of MTV's audio modules, from the network."""
    from avsync.loaders.common import _meta_module
    from avsync.networks.mtv import MTVTransformer

    net = _meta_module(lambda: MTVTransformer(cfg))
    return {k[len("audio."):]: tuple(v.shape) for k, v in net.state_dict().items() if k.startswith("audio.")}


def sat_state_dict(cfg, seed: int = 0, dtype=torch.float32, extra: bool = True) -> dict[str, torch.Tensor]:
    """A full SAT engine state dict for ``cfg`` with seeded random values (``extra``: a few
    ``conditioner.*`` / ``first_stage_model.*`` tensors, as the engine's state dict has)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {SAT + k: s for k, s in sat_backbone_shapes(cfg).items()}
    shapes.update({SAT + "transformer." + k: s for k, s in sat_audio_shapes(cfg).items()})
    if extra:
        shapes["conditioner.embedders.0.transformer.shared.weight"] = (8, 4)
        shapes["first_stage_model.encoder.conv_in.conv.weight"] = (4, 3, 3, 3, 3)
    return {k: (0.05 * torch.randn(s, generator=g)).to(dtype) for k, s in sorted(shapes.items())}


def save_sat_checkpoint(state: dict, folder, iteration: int = 1, rng_states: bool = True) -> Path:
    """``folder/latest`` + ``folder/<iteration>/mp_rank_00_model_states.pt`` as SAT/DeepSpeed save them."""
    folder = Path(folder)
    (folder / str(iteration)).mkdir(parents=True, exist_ok=True)
    sd = {
        "module": collections.OrderedDict(state), "buffer_names": [], "optimizer": None,
        "param_shapes": [collections.OrderedDict((k, torch.Size(v.shape)) for k, v in list(state.items())[:3])],
        "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None,
        "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
        "global_steps": iteration, "global_samples": 8 * iteration, "dp_world_size": 8, "mp_world_size": 1,
        "ds_config": {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
        "ds_version": "0.14.4", "iteration": iteration,
        "client_lr_scheduler": {"start_lr": 1e-5, "warmup_iter": 0, "num_iters": iteration, "decay_style": "constant"},
    }
    if rng_states:
        sd.update(random_rng_state=random.Random(0).getstate(), np_rng_state=np.random.RandomState(0).get_state(),
                  torch_rng_state=torch.Generator().manual_seed(0).get_state(),
                  cuda_rng_state=torch.Generator().manual_seed(1).get_state())
    path = folder / str(iteration) / "mp_rank_00_model_states.pt"
    torch.save(sd, path)
    (folder / "latest").write_text(str(iteration))
    return path
