"""ComfyUI node classes (this folder: thin wrappers that call ``loaders`` and hand ComfyUI its own
objects) and their integration with ComfyUI's model objects (``integration``)."""
