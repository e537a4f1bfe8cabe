"""llama.cpp's reference quantizers as an oracle: ggml's ``ggml-quants.c``, taken from the source
distribution of llama-cpp-python on PyPI (which vendors llama.cpp), compiled with plain gcc into a
small shared library and called through ctypes. Built without floating-point contraction
(``-ffp-contract=off``, no ``-march``/``-mfma``): with fused multiply-adds the K-quant bytes change.

    lib = reference()            # None (with the reason in ``why_not``) where it cannot be built
    blocks = quantize_ref(lib, "q4_K", rows)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants

from loaders.gguf.writer import encode

SDIST = "llama-cpp-python==0.3.36"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "llama_cpp_ref"
why_not = ""


@functools.cache
def reference() -> ctypes.CDLL | None:
    """The compiled reference quantizers, built once into .cache (None where impossible: see why_not)."""
    global why_not
    # Named for the stubs it was built with: a changed stub builds a new library.
    lib = CACHE / f"libggml_quants_ref-{hashlib.sha256(STUBS.encode()).hexdigest()[:8]}.so"
    try:
        if not lib.exists():
            _build(lib)
        return ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError, StopIteration, tarfile.TarError) as e:
        why_not = f"llama.cpp's quantizers could not be built: {type(e).__name__}: {e}"
        return None


def _build(lib: Path) -> None:
    if shutil.which("gcc") is None:
        raise OSError("no gcc")
    CACHE.mkdir(parents=True, exist_ok=True)
    archives = list(CACHE.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(CACHE)], check=True, capture_output=True, timeout=600)
        archives = list(CACHE.glob("llama_cpp_python-*.tar.gz"))
    src = CACHE / "ggml"
    with tarfile.open(archives[0]) as tar:
        # ggml-quants.c and the headers it reaches (ggml's own, the CPU backend's).
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/ggml/" in m.name
                   and (m.name.endswith("/ggml-quants.c") or (m.name.endswith(".h") and (
                       "/ggml/include/" in m.name or m.name.count("/ggml/src/") and m.name.rsplit("/ggml/src/", 1)[1]
                       .count("/") <= 1 and ("/src/ggml-cpu/" in m.name or "/" not in m.name.rsplit("/ggml/src/", 1)[1]))))]
        tar.extractall(src, members=members, filter="data")
    root = next(src.rglob("vendor/llama.cpp/ggml"))
    # What ggml-quants.c takes from the rest of ggml, on paths the row quantizers never reach.
    stubs = CACHE / "stubs.c"
    stubs.write_text(STUBS)
    subprocess.run(["gcc", "-O2", "-ffp-contract=off", "-fno-fast-math", "-std=c11", "-fPIC", "-shared",
                    f"-I{root / 'include'}", f"-I{root / 'src'}", str(root / "src" / "ggml-quants.c"), str(stubs),
                    "-lm", "-o", str(lib)], check=True, capture_output=True, timeout=300)


STUBS = """
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "%s:%d\\n", file, line); abort(); }
const char * ggml_type_name(enum ggml_type type) { (void) type; abort(); }
size_t ggml_type_size(enum ggml_type type) { (void) type; abort(); }
size_t ggml_row_size(enum ggml_type type, int64_t ne) {  /* quantize_<type> with an importance matrix */
    switch (type) {
        case GGML_TYPE_Q4_0: case GGML_TYPE_IQ4_NL: return ne / 32 * 18;
        case GGML_TYPE_Q4_1: return ne / 32 * 20;
        case GGML_TYPE_Q5_0: return ne / 32 * 22;
        case GGML_TYPE_Q5_1: return ne / 32 * 24;
        case GGML_TYPE_Q8_0: return ne / 32 * 34;
        case GGML_TYPE_Q2_K: return ne / 256 * 84;
        case GGML_TYPE_Q3_K: return ne / 256 * 110;
        case GGML_TYPE_Q4_K: return ne / 256 * 144;
        case GGML_TYPE_Q5_K: return ne / 256 * 176;
        case GGML_TYPE_Q6_K: return ne / 256 * 210;
        case GGML_TYPE_IQ4_XS: return ne / 256 * 136;
        default: abort();
    }
}
"""


def quantize_ref(lib: ctypes.CDLL, name: str, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's quantization of float32 ``rows`` (whole blocks) as ``ggml_quantize_chunk`` does it:
    without an importance matrix ``quantize_row_<name>_ref``, or for the IQ4 types
    ``quantize_<name>``; with one (a value per column), ``quantize_<name>``; their block bytes."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    block, size = GGML_QUANT_SIZES[T[name.upper()]]
    out = np.empty(rows.size // block * size, dtype=np.uint8)
    if name.startswith("iq4") or importance is not None:
        weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        fn = getattr(lib, f"quantize_{name}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = ctypes.c_size_t
        fn(rows.ctypes.data, out.ctypes.data, rows.shape[0], rows.shape[-1],
           None if weights is None else weights.ctypes.data)
    else:
        fn = getattr(lib, f"quantize_row_{name}_ref")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
        fn(rows.ctypes.data, out.ctypes.data, rows.size)
    return out.reshape(-1, size)


def expected(value: torch.Tensor, qtype: T) -> np.ndarray:
    """What a tensor of ``value`` reads back as when stored as ``qtype``: llama.cpp's reference
    quantizer's bytes (ours where it cannot be built) decoded by the gguf package."""
    a = value.numpy().astype(np.float32)
    if qtype == T.F32:
        return a
    if qtype == T.F16:
        return a.astype(np.float16).astype(np.float32)
    lib = reference()
    if lib is not None and qtype not in (T.BF16,):
        data = quantize_ref(lib, qtype.name.lower().replace("_k", "_K"), a.reshape(-1, a.shape[-1]))
    else:
        data = encode(a, qtype)
    return quants.dequantize(data, qtype).reshape(a.shape).astype(np.float32)
