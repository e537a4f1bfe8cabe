"""GGUF files: the reader (``reader``), what kind of model a file holds (``file_kind``), its tensors
as a torch state dict (``state_dict``), the errors that name a bad file (``errors``), and writing
files (``writer``)."""
