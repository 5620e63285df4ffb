"""Generative inbetweening node: first and last frame → the video between them (SVD-XT,
dual-directional sampling with rotated temporal attention; Generative Inbetweening, Alg. 2)."""

from __future__ import annotations

import torch

from ..core.errors import InputError
from ..samplers.inbetween import (
    CFG_SCHEDULES,
    EXECUTIONS,
    FUSE_MODES,
    VARIANT_HELP,
    VARIANTS,
    InbetweenSettings,
    generate_inbetween,
)
from .checks import size_refusal
from .sockets import IMAGE, SVD_BACKWARD, SVD_MODEL

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _keyframe(image, name: str, index: int) -> torch.Tensor:
    """One frame ``[H, W, 3]`` of an IMAGE batch (RGBA loses its alpha)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] < 1 or image.shape[-1] not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(name, f"expected an IMAGE [batch, height, width, 3], got {shape}")
    if image.shape[1] < 8 or image.shape[2] < 8:
        raise InputError(name, f"image of {image.shape[2]}×{image.shape[1]} px is too small")
    return image[index, :, :, :3].float()


class AVSyncDualDirectionalSampler:
    DESCRIPTION = (
        "Generates the frames between a first and a last image with Stable Video Diffusion XT, as in Generative "
        "Inbetweening: a forward generation from the first frame and a backward generation from the last frame "
        "(using the forward generation's temporal attention rotated 180° and the backward-motion weights) are fused "
        "at every step, with re-noising to make them agree. Outputs all frames, the first and last included, "
        "ready for CreateVideo (7 fps matches SVD's conditioning)."
    )
    CATEGORY = "AVSync/inbetween"
    FUNCTION = "generate"
    RETURN_TYPES = (IMAGE,)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The generated video as IMAGE frames [frames, height, width, 3]; the first frame corresponds "
                       "to first_image and the last to last_image.",)

    @classmethod
    def INPUT_TYPES(cls):
        d = InbetweenSettings()
        return {
            "required": {
                "svd_model": (SVD_MODEL, {"tooltip": "SVD-XT from AVSyncSVDLoader (svd_xt.safetensors or a diffusers folder)."}),
                "first_image": (IMAGE, {"tooltip": "The first keyframe (the first image of the batch is used). "
                                                   "Stretched to width × height if its size differs."}),
                "last_image": (IMAGE, {"tooltip": "The last keyframe (the last image of the batch is used). "
                                                  "Stretched to width × height if its size differs."}),
                "frames": ("INT", {"default": d.num_frames, "min": 3, "max": 64, "tooltip":
                           "Frames to generate, first and last included. SVD-XT was trained on 25."}),
                "width": ("INT", {"default": d.width, "min": 64, "max": 2048, "step": 64, "tooltip":
                          "Video width in pixels (multiple of 64). SVD-XT was trained at 1024."}),
                "height": ("INT", {"default": d.height, "min": 64, "max": 2048, "step": 64, "tooltip":
                           "Video height in pixels (multiple of 64). SVD-XT was trained at 576."}),
                "steps": ("INT", {"default": d.steps, "min": 1, "max": 200, "tooltip":
                          "Euler steps on the Karras σ schedule 700 → 0.002 (the release uses 50). Each re-noised "
                          "step costs renoise_repeats more model evaluations."}),
                "cfg": ("FLOAT", {"default": d.cfg, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip":
                        "Classifier-free guidance scale, applied in each branch (the release: 2.0). With the "
                        "linear schedule it is the ramp's mean. 1.0 or less turns guidance off (half the work)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip":
                         "Seed of every random draw (initial noise, conditioning noise, re-noising). Same seed, "
                         "same video."}),
                "renoise_repeats": ("INT", {"default": d.renoise_repeats, "min": 0, "max": 20, "tooltip":
                                    "How often each early step is re-noised and repeated so the two directions "
                                    "agree (the release: 5). 0 turns it off."}),
                "renoise_ratio": ("FLOAT", {"default": d.renoise_ratio, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                                  "Fraction of the steps, from the start, that are re-noised and repeated "
                                  "(the release: 0.5)."}),
                "fuse": (list(FUSE_MODES), {"default": d.fuse, "tooltip":
                         "average: forward and backward predictions weigh 0.5 each (the release's default). "
                         "weighted: per frame from all-forward at the first frame to all-backward at the last."}),
                "decode_chunk_size": ("INT", {"default": d.decode_chunk_size, "min": 1, "max": 64, "tooltip":
                                      "Frames the VAE decodes at once. Larger is smoother across chunk borders "
                                      "but needs more memory (the release decodes all 25 at once)."}),
                "variant": (list(VARIANTS), {"default": d.variant, "tooltip":
                            "; ".join(f"{k}: {v}" for k, v in VARIANT_HELP.items()) + "."}),
            },
            "optional": {
                "backward_weights": (SVD_BACKWARD, {"tooltip":
                                     "Backward-motion ΔW from AVSyncBackwardMotionLoader. Needed by variant 'full'; "
                                     "ignored by the others."}),
                "cfg_schedule": (list(CFG_SCHEDULES), {"default": d.cfg_schedule, "tooltip":
                                 "constant: the same scale for every frame (the release's default). linear: per "
                                 "frame from min_cfg to 2·cfg − min_cfg in each branch's own time direction "
                                 "(the release's --weighted_average)."}),
                "min_cfg": ("FLOAT", {"default": d.min_cfg, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip":
                            "Start of the linear guidance ramp (the frame a branch starts from); unused for constant."}),
                "motion_bucket_id": ("INT", {"default": d.motion_bucket_id, "min": 0, "max": 1023, "tooltip":
                                     "SVD's motion conditioning: more motion for higher values (default 127)."}),
                "fps": ("INT", {"default": d.fps, "min": 1, "max": 60, "tooltip":
                        "Frame rate SVD is conditioned on (it sees fps − 1, as trained); 7 is the default. Use the "
                        "same rate in CreateVideo."}),
                "noise_aug_strength": ("FLOAT", {"default": d.noise_aug_strength, "min": 0.0, "max": 1.0,
                                                 "step": 0.01, "tooltip":
                                       "Noise added to both keyframes before VAE encoding (one noise image shared by "
                                       "both); SVD's default 0.02."}),
                "execution": (list(EXECUTIONS), {"default": d.execution, "tooltip":
                              "fused: both directions and guidance halves in one model call per step, attention "
                              "handed over inside each layer, no maps stored across layers. two_call: forward call "
                              "storing all layers' attention maps, then the backward call (the same result up to "
                              "float32 rounding; on CPU it measured faster than fused, on GPU it has not been "
                              "measured)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None):
        """The size alone, before the SVD model is loaded (the model's own multiple, 64 for SVD, is checked
        when it runs). ComfyUI skips its min/max check for an input taken here, so the range is checked too;
        a linked value arrives as None and is checked when the node runs."""
        return size_refusal(cls.INPUT_TYPES(), width, height) or True

    def generate(self, svd_model, first_image, last_image, frames, width, height, steps, cfg, seed,
                 renoise_repeats, renoise_ratio, fuse, decode_chunk_size, variant, backward_weights=None,
                 cfg_schedule="constant", min_cfg=1.0, motion_bucket_id=127, fps=7, noise_aug_strength=0.02,
                 execution="fused"):
        settings = InbetweenSettings(
            num_frames=int(frames), width=int(width), height=int(height), steps=int(steps), cfg=float(cfg),
            cfg_schedule=cfg_schedule, min_cfg=float(min_cfg), fuse=fuse, renoise_repeats=int(renoise_repeats),
            renoise_ratio=float(renoise_ratio), fps=int(fps), motion_bucket_id=int(motion_bucket_id),
            noise_aug_strength=float(noise_aug_strength), decode_chunk_size=int(decode_chunk_size),
            variant=variant, execution=execution,
        ).validate()
        if svd_model is None or not all(hasattr(svd_model, a) for a in ("unet", "vae", "image_encoder")):
            raise InputError("svd_model", "expected an SVD model from AVSyncSVDLoader")
        first = _keyframe(first_image, "first_image", 0)
        last = _keyframe(last_image, "last_image", -1)
        weights = backward_weights if variant == "full" else None
        out = generate_inbetween(svd_model, first, last, settings, backward_weights=weights, seed=int(seed))
        return (out,)


NODE_CLASS_MAPPINGS = {"AVSyncDualDirectionalSampler": AVSyncDualDirectionalSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"AVSyncDualDirectionalSampler": "AVSync Dual-Directional Sampler (SVD inbetweening)"}
