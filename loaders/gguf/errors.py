"""The one exception type the library raises for bad input.

Every message names the file and the fault, so a ComfyUI user sees what is wrong with which file
instead of a traceback from deep inside a model.
"""

from __future__ import annotations

import os


class GGUFError(ValueError):
    """A GGUF file cannot be used: unreadable, damaged, or of the wrong kind for the loader."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else os.fspath(path)
        self.reason = message
        where = f"{os.path.basename(self.path)}: " if self.path else ""
        super().__init__(f"{where}{message}")
