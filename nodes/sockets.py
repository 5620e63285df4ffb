"""Socket type names. Custom types are prefixed ``AVSYNC_``; they are saved inside
users' workflows, so never rename one."""

# core ComfyUI types
AUDIO = "AUDIO"
IMAGE = "IMAGE"
MODEL = "MODEL"                         # a core diffusion model (ModelPatcher)

# AVSync types
TIMELINE = "AVSYNC_TIMELINE"            # core.timeline.Timeline
KEYFRAMES = "AVSYNC_KEYFRAMES"          # keyframe indices + curve (issue: KeyframeLocalizer)
GUIDANCE = "AVSYNC_GUIDANCE"            # Audio Sync Guidance settings
LOCALIZER_MODEL = "AVSYNC_LOCALIZER_MODEL"
DEMIX_MODEL = "AVSYNC_DEMIX_MODEL"
SVD_MODEL = "AVSYNC_SVD_MODEL"
SVD_BACKWARD = "AVSYNC_SVD_BACKWARD"
SYNC_REPORT = "AVSYNC_SYNC_REPORT"      # core.sync_metrics.SyncReport
KEYVID_MODEL = "AVSYNC_KEYVID_MODEL"              # loaders.keyvid.KeyVIDModel with role "generator"
KEYVID_INTERP_MODEL = "AVSYNC_KEYVID_INTERP_MODEL"  # loaders.keyvid.KeyVIDModel with role "interpolator"
KEYVID_KEYFRAMES = "AVSYNC_KEYVID_KEYFRAMES"      # samplers.keyvid.KeyVIDKeyframes (generator → interpolator)
MTV_MODEL = "AVSYNC_MTV_MODEL"                    # samplers.mtv.MTVModel (AVSyncMTVLoader → AVSyncMTVGenerator)
