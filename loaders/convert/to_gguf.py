"""Converting a checkpoint to GGUF: the recipe's type for each tensor, then each tensor read,
checked and encoded in turn into a temporary file that becomes the output only when complete.

Memory stays at about one tensor (the largest, in float32, plus its encoding) whatever the model's
size. Nothing half-written is ever left under the output's name: a failure, a full disk or an
interruption removes the temporary file.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..gguf.errors import GGUFError
from ..gguf.writer import Planned, encode, stored_shape, write_tensors
from ..quant.formats import FORMATS
from .checkpoint import Checkpoint
from .imatrix import importance_for, means, provenance, read_sums
from .recipes import IMAGE_ARCHS, LEVELS, Level, float_recipe, image_recipe, llm_recipe

log = logging.getLogger("qwen_image_gguf.convert")

F16_MAX = float(np.finfo(np.float16).max)
# Room for the header (names, shapes, metadata, a tokenizer) beyond the tensors' bytes.
HEADER_ROOM = 64 * 2**20

Progress = Callable[[int, int, str], None]  # (bytes written, bytes in all, the tensor just written)


@dataclass
class Converted:
    path: str
    types: dict[str, T]
    nbytes: int

    def summary(self) -> str:
        counts = Counter(t.name for t in self.types.values())
        return ", ".join(f"{n} {name}" for name, n in counts.most_common())


def level_of(name: str) -> Level:
    if name not in LEVELS:
        raise ValueError(f"unknown output type {name!r}; choose one of {', '.join(LEVELS)}")
    return LEVELS[name]


def plan(ckpt: Checkpoint, level: Level, metadata: dict) -> list[Planned]:
    """Each tensor with its recipe type, in the order written (``metadata`` gets the shapes of
    tensors stored flattened)."""
    if ckpt.kind == "mmproj":
        if level.bulk not in (T.F16, T.BF16):
            raise GGUFError(ckpt.path, f"an mmproj is written in F16 or BF16, as llama.cpp's are, not {level.name}")
        recipe = float_recipe(level.bulk)
    elif ckpt.kind == "text_encoder":
        recipe = llm_recipe(level, ckpt.layers, ckpt.gqa, ckpt.tied)
    else:
        recipe = image_recipe(level, IMAGE_ARCHS[ckpt.arch], ckpt.layers, ckpt.half)
    out = []
    for name, shape in ckpt.shapes.items():
        qtype = recipe(name, shape)
        if qtype == T.F16 and level.bulk != T.F16 and _beyond_f16(_read(ckpt, name)) is not None:
            qtype = T.BF16  # kept in 16 bits by the recipe (a few small tensors), but F16 cannot hold it
        out.append(Planned(name, stored_shape(name, shape, metadata), qtype))
    return out


def _read(ckpt: Checkpoint, name: str) -> np.ndarray:
    try:
        return ckpt.load(name).numpy()
    except GGUFError:
        raise
    except Exception as e:  # noqa: BLE001  (a damaged input file, a patch that does not fit: named)
        raise GGUFError(ckpt.path, f"tensor {name} cannot be read ({type(e).__name__}: {e})") from None


def _beyond_f16(a: np.ndarray) -> float | None:
    """The largest magnitude of ``a`` where F16 cannot hold it, else None."""
    peak = float(np.abs(a).max()) if a.size else 0.0
    return peak if peak > F16_MAX else None


def _checked(ckpt: Checkpoint, p: Planned) -> np.ndarray:
    """The tensor in float32, refused if it holds a value the type cannot store."""
    a = _read(ckpt, p.name).reshape(p.shape)
    bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise GGUFError(ckpt.path, f"tensor {p.name} holds {bad:,} non-finite values (NaN or infinity): the "
                                   "weights are damaged; nothing was written")
    if p.qtype == T.F16 and (peak := _beyond_f16(a)) is not None:
        raise GGUFError(ckpt.path, f"tensor {p.name} holds values beyond F16's range (largest {peak:.3g}); "
                                   "convert to BF16 instead")
    return a


def _encoded(ckpt: Checkpoint, p: Planned, device: str | None, importance: np.ndarray | None) -> np.ndarray:
    """The tensor's stored form, refused where a block type's 16-bit scales cannot hold its values
    (they would decode to infinity or NaN)."""
    a = _checked(ckpt, p)
    data = encode(a, p.qtype, device, importance)
    if p.qtype in FORMATS:
        decoded = FORMATS[p.qtype].dequantize(torch.from_numpy(data).reshape(-1), p.shape, torch.float32)
        if not bool(torch.isfinite(decoded).all()):
            raise GGUFError(ckpt.path, f"tensor {p.name} holds values too large for {p.qtype.name}'s 16-bit block "
                                       f"scales (largest {float(np.abs(a).max()):.3g}); convert to BF16 instead")
    return data


# Where an output file is there already (the saver node and the command line both write through here).
_EXISTS = "already exists; choose another name or allow overwriting (the node's overwrite, the command line's --overwrite)"


def convert(ckpt: Checkpoint, output: str | os.PathLike, level: str, overwrite: bool = False,
            progress: Progress | None = None, device: str | None = None,
            imatrix: str | os.PathLike | None = None) -> Converted:
    """Write ``ckpt`` as a GGUF of ``level`` (a name of ``recipes.LEVELS``) to ``output``, encoding
    block types on ``device`` (default the CPU; a GPU gives the same bytes), their searches weighted
    by the importance matrix file ``imatrix`` where it has the tensor (llama.cpp's ``--imatrix``)."""
    level_ = level_of(level)
    output = os.fspath(output)
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise GGUFError(None, f"{output} is a folder: give the name of the .gguf file to write")
    if os.path.exists(output) and not overwrite:
        raise GGUFError(output, _EXISTS)
    if not os.path.isdir(folder):
        raise GGUFError(output, f"its folder {folder} does not exist")
    metadata = {"general.file_type": int(level_.file_type), "general.quantization_version": 2, **ckpt.metadata}
    tensors = plan(ckpt, level_, metadata)
    weighted = _importance(imatrix, tensors, metadata) if imatrix is not None else {}
    total = sum(p.nbytes for p in tensors)
    free = shutil.disk_usage(folder).free
    if total + HEADER_ROOM > free:
        raise GGUFError(ckpt.path, f"the {level} file needs {total / 1e9:.2f} GB and {folder} has "
                                   f"{free / 1e9:.2f} GB free; nothing was written")
    for p in tensors:
        log.debug("%s %s -> %s", p.name, "x".join(map(str, p.shape)), p.qtype.name)
    # A visible name beside the output: a run killed outright leaves a file the user can see (and
    # the next run to the same output replaces).
    temporary = output + ".part"
    written = 0

    def done(p: Planned) -> None:
        nonlocal written
        written += p.nbytes
        if progress:
            progress(written, total, p.name)

    try:
        write_tensors(temporary, tensors, lambda p: _encoded(ckpt, p, device, weighted.get(p.name)), ckpt.arch,
                      metadata, done)
        os.chmod(temporary, 0o666 & ~_umask())
        if os.path.exists(output) and not overwrite:  # made while we wrote
            raise GGUFError(output, _EXISTS)
        os.replace(temporary, output)
    except OSError as e:
        # numpy reports a short write without an errno: a full disk too.
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or (e.errno is None and "written" in str(e))
        if full:
            raise GGUFError(ckpt.path, f"the disk of {folder} is full ({e.strerror or e}); nothing was written") from None
        raise GGUFError(output, f"cannot be written ({e.strerror or e}); nothing was written") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    result = Converted(output, {p.name: p.qtype for p in tensors}, os.path.getsize(output))
    log.info("%s: %s %s written as %s (%.2f GB): %s", os.path.basename(ckpt.path), ckpt.variant,
             ckpt.kind.replace("_", " "), os.path.basename(output), result.nbytes / 1e9, result.summary())
    return result


def _importance(path: str | os.PathLike, tensors: list[Planned], metadata: dict) -> dict[str, np.ndarray]:
    """The importance of each planned block-type tensor the matrix at ``path`` has, refused where it
    has none of them (a matrix of another model); ``metadata`` gets llama-quantize's record of it."""
    data = read_sums(path)
    importance = means(data, path)
    quantized = [p for p in tensors if p.qtype in FORMATS and FORMATS[p.qtype].weighting is not None]
    if not quantized:
        log.warning("%s: no tensor of this type searches for its codes; the importance matrix is not used",
                    os.path.basename(path))
        return {}
    found = {p.name: v for p in quantized
             if (v := importance_for(importance, p.name, p.shape[-1], os.fspath(path))) is not None}
    if not found:
        raise GGUFError(path, f"has none of the {len(quantized)} weights to quantize (its first: "
                              f"{next(iter(importance))}; the model's: {quantized[0].name}): it was collected "
                              "from another model")
    log.info("%s: importance for %d of %d quantized tensors", os.path.basename(path), len(found), len(quantized))
    metadata.update(provenance(data, path, len(importance)))
    return found


def _umask() -> int:
    """The process's file-creation mask (read, not set: setting it to read it races other threads)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022
