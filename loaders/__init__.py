"""The GGUF library: reading files, quantized tensors, dequantization, name maps and model configs.

It imports no ComfyUI module, so it can be used and tested on its own.
"""
