"""The models a GGUF file holds, each with its config derived from the file: the diffusion model
(``diffusion``: Qwen-Image and its variants, Z-Image), the text encoder (``text_encoder``, with its
tokenizer rebuilt from the file in ``tokenizer``) and the VAE (``vae``)."""
