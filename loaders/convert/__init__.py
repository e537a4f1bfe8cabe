"""Making GGUF files from safetensors checkpoints and ComfyUI models: ``recipes`` (which type each
tensor gets), ``checkpoint`` (reading the input), ``to_gguf`` (writing the output); ``python -m
loaders.convert`` is the command line."""
