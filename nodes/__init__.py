"""ComfyUI node classes: thin wrappers that call ``loaders`` and hand ComfyUI its own objects."""
