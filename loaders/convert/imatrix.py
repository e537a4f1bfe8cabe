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
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType as T, GGUFReader

from ..gguf.errors import GGUFError
from ..gguf.writer import write_encoded

SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass
class Sums:
    """What an imatrix file holds: per weight the sums of squares and how many rows were summed, the
    model calls (``imatrix.chunk_count``) and the datasets named."""
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    calls: int = 0
    datasets: list[str] = field(default_factory=list)


class ImportanceCollector:
    """Sums of squared activations per input channel of the weights it is shown inputs of, kept in
    float32 on the inputs' device (as llama.cpp keeps them)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.calls = 0
        # Per file it saved to, what the file held before (added to at every save, never twice).
        self._bases: dict[str, Sums] = {}

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

    def save(self, path: str | os.PathLike, dataset: str, replace: bool = False) -> Sums:
        """Write the sums as llama.cpp's GGUF imatrix (under a temporary name, renamed when complete),
        added to what an existing file at ``path`` held when this collector first saved there (as
        llama-imatrix's --in-file adds), unless ``replace``; returns what was written."""
        if not self.sums:
            raise GGUFError(path, "no activations were collected: run a sampler on the collector's MODEL first")
        path = os.fspath(path)
        key = os.path.abspath(path)
        if key not in self._bases:
            self._bases[key] = read_sums(path) if os.path.exists(path) and not replace else Sums()
        base = self._bases[key]
        total = Sums(dict(base.sums), dict(base.counts), base.calls + self.calls,
                     base.datasets + [dataset] * (dataset not in base.datasets))
        for name, sums in self.sums.items():
            mine = sums.cpu().numpy()
            if name in total.sums:
                if total.sums[name].shape != mine.shape:
                    raise GGUFError(path, f"holds {name} with {total.sums[name].shape[0]} channels where this model's "
                                          f"has {mine.shape[0]}: it was collected from another model; choose "
                                          "another name or replace it")
                mine = total.sums[name] + mine
            total.sums[name] = mine
            total.counts[name] = total.counts.get(name, 0.0) + self.counts[name]
        _write(path, total)
        return total


def _write(path: str, data: Sums) -> None:
    temporary = path + ".part"
    metadata = {"general.type": "imatrix", "imatrix.datasets": data.datasets, "imatrix.chunk_count": data.calls,
                "imatrix.chunk_size": 1}
    tensors = {}
    for name in sorted(data.sums):
        tensors[name + SUMS] = (data.sums[name].astype(np.float32).reshape(1, -1), T.F32)
        tensors[name + COUNTS] = (np.array([[data.counts[name]]], dtype=np.float32), T.F32)
    try:
        # No architecture key: llama.cpp's imatrix files carry none.
        write_encoded(temporary, tensors, None, metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_sums(path: str | os.PathLike) -> Sums:
    """The sums and counts of a GGUF imatrix file, checked."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(path, f"cannot be read ({e.strerror or e})") from None
    if len(magic) < 4:
        raise GGUFError(path, "is empty")
    if magic != b"GGUF":
        raise GGUFError(path, "is not a GGUF imatrix (llama.cpp's legacy .dat format is not read: convert it with "
                              "llama-imatrix --in-file FILE -o FILE.gguf)")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GGUFError(path, f"is damaged ({e})") from None
    field_ = reader.get_field("general.type")
    if field_ is None or field_.contents() != "imatrix":
        raise GGUFError(path, "is a GGUF file but not an importance matrix (general.type is not \"imatrix\")")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    data = Sums()
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
        if not (np.isfinite(sums).all() and (sums >= 0).all() and np.isfinite(count) and count >= 0):
            raise GGUFError(path, f"{name} holds negative or non-finite sums of squares: the file is damaged")
        data.sums[name], data.counts[name] = sums.reshape(-1), count
    if (calls := reader.get_field("imatrix.chunk_count")) is not None:
        data.calls = int(calls.contents())
    if (datasets := reader.get_field("imatrix.datasets")) is not None:
        data.datasets = list(datasets.contents())
    return data


def read_importance(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Each weight's importance (``in_sum2 / counts``: one value per input channel) from a GGUF
    imatrix file; weights never reached (count 0) are left out."""
    return means(read_sums(path), path)


def means(data: Sums, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The importance of each weight of ``data`` (read from ``path``) that was reached."""
    out = {name: sums / np.float32(data.counts[name]) for name, sums in data.sums.items() if data.counts[name] > 0}
    if not out:
        raise GGUFError(path, "holds no collected weights")
    return out


def provenance(data: Sums, path: str | os.PathLike, entries: int) -> dict[str, str | int]:
    """The metadata llama-quantize writes into a file quantized with an importance matrix."""
    return {"quantize.imatrix.file": os.path.basename(os.fspath(path)),
            **({"quantize.imatrix.dataset": data.datasets[0]} if data.datasets else {}),
            "quantize.imatrix.entries_count": entries, "quantize.imatrix.chunks_count": data.calls}


def importance_for(importance: Mapping[str, np.ndarray], name: str, row: int, path: str) -> np.ndarray | None:
    """The importance of weight ``name`` (rows of ``row`` values), None where the matrix has none."""
    values = importance.get(name)
    if values is not None and values.shape[0] != row:
        raise GGUFError(path, f"its entry for {name} has {values.shape[0]} channels but the weight's rows have "
                              f"{row}: it was collected from another model")
    return values
