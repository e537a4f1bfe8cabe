"""The GGUF library, importing no ComfyUI module, so it can be used and tested on its own:

- ``gguf``: reading (and writing) GGUF files, their tensors as a torch state dict, errors that name the file;
- ``quant``: the quant-format registry, the quantized weight, per-layer execution plans, the Triton kernels;
- ``models``: the diffusion model, text encoder and VAE, each with its config derived from the file;
- ``compat``: the torch and Triton internals relied on, each checked once with its fallback;
- ``downloads``: the model files of the presets and their download (the installer's manifest).
"""
