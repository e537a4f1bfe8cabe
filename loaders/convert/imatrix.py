"""Importance matrices: for each weight, the mean square of each input channel's activations over
some prompts, which the quantizers weight their searches by (llama.cpp's ``--imatrix``).

Files are llama.cpp's GGUF imatrix format, so its own (for a text encoder) work here and ours in
its tools: per weight ``<name>.in_sum2`` (the sums of squares, one row per matrix) and
``<name>.counts`` (how many activation rows were summed), ``general.type`` "imatrix". The names are
the weights' names in the GGUF being made (ComfyUI's, for a diffusion model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from gguf import GGUFReader, GGUFWriter

from ..gguf.errors import GGUFError

SUMS, COUNTS = ".in_sum2", ".counts"


class ImportanceCollector:
    """Sums of squared activations per input channel of the weights it is shown inputs of, kept in
    float32 on the inputs' device (as llama.cpp keeps them)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.calls = 0
        self.saved: set[str] = set()  # the files it wrote (which it may update)

    def add(self, name: str, x: torch.Tensor) -> None:
        """Count ``x`` (any leading shape, channels last) as inputs of the weight ``name``."""
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        square = (rows * rows).sum(dim=0)
        if name in self.sums:
            if self.sums[name].shape != square.shape:
                raise ValueError(f"{name}: inputs of {square.shape[0]} channels after {self.sums[name].shape[0]}")
            self.sums[name] += square.to(self.sums[name].device)
            self.counts[name] += rows.shape[0]
        else:
            self.sums[name], self.counts[name] = square, rows.shape[0]

    def save(self, path: str | os.PathLike, datasets: list[str]) -> int:
        """Write the sums as llama.cpp's GGUF imatrix (under a temporary name, renamed when complete);
        returns the number of weights."""
        if not self.sums:
            raise GGUFError(path, "no activations were collected: run a sampler on the collector's MODEL first")
        path = os.fspath(path)
        temporary = path + ".part"
        writer = GGUFWriter(temporary, arch="imatrix")
        writer.kv_data[0].pop("general.architecture", None)  # llama.cpp's imatrix files carry none
        try:
            writer.add_type("imatrix")
            writer.add_array("imatrix.datasets", datasets or ["prompts"])
            writer.add_uint32("imatrix.chunk_count", self.calls)
            writer.add_uint32("imatrix.chunk_size", 1)
            for name in sorted(self.sums):
                writer.add_tensor(name + SUMS, self.sums[name].cpu().numpy().reshape(1, -1))
                writer.add_tensor(name + COUNTS, np.array([[self.counts[name]]], dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return len(self.sums)


def read_importance(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Each weight's importance (``in_sum2 / counts``: one value per input channel) from a GGUF
    imatrix file; weights never reached (count 0) are left out."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(path, f"cannot be read ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise GGUFError(path, "is not a GGUF imatrix (llama.cpp's legacy .dat format is not read: convert it with "
                              "llama-imatrix --in-file FILE -o FILE.gguf)")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GGUFError(path, f"is damaged ({e})") from None
    field = reader.get_field("general.type")
    if field is None or field.contents() != "imatrix":
        raise GGUFError(path, "is a GGUF file but not an importance matrix (general.type is not \"imatrix\")")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    out = {}
    for key, sums in tensors.items():
        if not key.endswith(SUMS):
            continue
        name = key.removesuffix(SUMS)
        counts = tensors.get(name + COUNTS)
        if counts is None:
            raise GGUFError(path, f"{name} has sums of squares but no counts")
        if counts.size != 1:  # one count per expert matrix: no model we convert has experts
            raise GGUFError(path, f"{name} holds {counts.size} matrices; only single-matrix weights are supported")
        count = float(counts.reshape(-1)[0])
        if not (np.isfinite(sums).all() and (sums >= 0).all() and np.isfinite(count)):
            raise GGUFError(path, f"{name} holds negative or non-finite sums of squares: the file is damaged")
        if count > 0:
            out[name] = sums.reshape(-1) / np.float32(count)
    if not out:
        raise GGUFError(path, "holds no collected weights")
    return out


def importance_for(importance: Mapping[str, np.ndarray], name: str, row: int, path: str) -> np.ndarray | None:
    """The importance of weight ``name`` (rows of ``row`` values), None where the matrix has none."""
    values = importance.get(name)
    if values is not None and values.shape[0] != row:
        raise GGUFError(path, f"its entry for {name} has {values.shape[0]} channels but the weight's rows have "
                              f"{row}: it was collected from another model")
    return values
