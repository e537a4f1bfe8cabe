"""Our models as ComfyUI's own MODEL, CLIP and VAE objects: the ops whose layers run the plans
(``ops``), LoRA patches in low-rank form (``lora``), the diffusion model (``diffusion``), text encoder
(``text_encoder``) and VAE (``vae``) builders, the NaN guard (``guard``), model folders and downloads
(``folders``, ``model_files``). Every ComfyUI internal they rely on beyond the classes and functions they build those objects with
is reached through ``compat``."""
