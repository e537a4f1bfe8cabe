"""The converter's command line; see ``--help``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

from ..gguf.errors import GGUFError
from .checkpoint import open_checkpoint, open_mmproj_checkpoint
from .recipes import LEVELS
from .to_gguf import convert


class Bar:
    """A one-line progress bar on standard error; where that is not a terminal (a log file), a line
    at every tenth of the way instead."""

    def __init__(self):
        self.start, self.open = time.perf_counter(), False
        self.terminal, self.tenths = sys.stderr.isatty(), -1

    def __call__(self, done: int, total: int, name: str) -> None:
        width = 30
        filled = int(width * done / total) if total else width
        rate = done / max(time.perf_counter() - self.start, 1e-9) / 1e6
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done / 1e9:6.2f}/{total / 1e9:.2f} GB "
                f"{rate:5.0f} MB/s {name[-40:]:<40}")
        if not self.terminal:
            tenths = 10 * done // total if total else 10
            if tenths != self.tenths:
                self.tenths = tenths
                sys.stderr.write(line.rstrip() + "\n")
            return
        sys.stderr.write("\r" + line)
        self.open = done != total
        sys.stderr.write("" if self.open else "\n")
        sys.stderr.flush()

    def close(self) -> None:
        """End the bar's line (before a message)."""
        if self.open:
            sys.stderr.write("\n")
            self.open = False


def _device(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here")
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loaders.convert",
        description="Convert a safetensors checkpoint (bf16, fp16, fp32 or Comfy-Org's fp8 scaled) of Qwen-Image, "
                    "Z-Image or a Qwen2.5-VL / Qwen3 text encoder to GGUF, with the type mix of the files users "
                    "download (city96's for diffusion models, llama.cpp's for text encoders).")
    parser.add_argument("input", help="the .safetensors checkpoint")
    parser.add_argument("output", nargs="?", help="the .gguf to write (default: INPUT's name with -TYPE.gguf)")
    parser.add_argument("--type", default="Q4_K_M", choices=list(LEVELS), help="output type (default Q4_K_M)")
    parser.add_argument("--tokenizer", help="a text encoder's Hugging Face tokenizer folder (vocab.json, merges.txt, "
                                            "tokenizer_config.json), written into the GGUF as llama.cpp does; "
                                            "ComfyUI's is comfy/text_encoders/qwen25_tokenizer")
    parser.add_argument("--mmproj", metavar="PATH", help="also write a Qwen2.5-VL text encoder's vision tower as "
                                                       "llama.cpp's mmproj (F16, or BF16 from a bf16 checkpoint)")
    parser.add_argument("--imatrix", metavar="FILE", help="an importance matrix (llama.cpp's GGUF imatrix format; for a "
                                                        "diffusion model, one collected in ComfyUI by 'Collect "
                                                        "Importance Matrix (GGUF)') to weight the quantizers' search")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--device", default=None, help="encode on this torch device, e.g. cuda (the same bytes as the CPU)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each tensor's type")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer's own notes on every file
    output = a.output or f"{os.path.splitext(a.input)[0]}-{a.type}.gguf"
    bar = Bar()
    try:
        device = _device(a.device)
        ckpt = open_checkpoint(a.input, a.tokenizer)
        if ckpt.kind == "text_encoder" and a.tokenizer is None:
            raise GGUFError(a.input, "a text encoder needs --tokenizer FOLDER: llama.cpp and this package read the "
                                     "tokenizer from the GGUF")
        vision = open_mmproj_checkpoint(a.input) if a.mmproj else None  # refused before anything is written
        print(f"{os.path.basename(a.input)}: {ckpt.variant} {ckpt.kind.replace('_', ' ')}, {ckpt.layers} blocks "
              f"-> {output} ({a.type})", file=sys.stderr)
        convert(ckpt, output, a.type, a.overwrite, bar, device, a.imatrix)
        if vision is not None:
            convert(vision, a.mmproj, vision.half.name, a.overwrite, Bar(), device)
    except ValueError as e:  # GGUFError, or an unknown --type or --device
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
