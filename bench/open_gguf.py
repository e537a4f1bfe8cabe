"""Time to open a GGUF whose header holds a Qwen2.5-VL-sized tokenizer: ours against gguf-py's reader.

Writes a file with 152,064 tokens, 151,387 merges and a few tensors (metadata as in real Qwen2.5-VL
GGUFs), then opens it with each reader several times and prints the median seconds and the ratio.
Runs on the CPU: python bench/open_gguf.py [workdir]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loaders.gguf.reader import GGUFFile  # noqa: E402

N_TOKENS, N_MERGES = 152_064, 151_387


def write_file(path: Path) -> None:
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzĠĊ"))
    tokens = ["".join(rng.choice(letters, rng.integers(1, 9))) + str(i) for i in range(N_TOKENS)]
    w = GGUFWriter(str(path), arch="qwen2vl")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(np.ones(N_TOKENS, dtype=np.int32).tolist())
    w.add_token_merges([f"{tokens[i]} {tokens[i + 1]}" for i in range(N_MERGES)])
    for i in range(4):
        w.add_tensor(f"blk.{i}.attn_q.weight", rng.standard_normal((256, 256)).astype(np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    path = work / "tokenizer-header.gguf"
    write_file(path)
    ours = median_seconds(lambda: GGUFFile(path), 5)
    theirs = median_seconds(lambda: GGUFReader(str(path)), 2)
    print(f"| reader | open (s, median) |\n|---|---|\n| ours | {ours:.3f} |\n| gguf-py GGUFReader | {theirs:.3f} |")
    print(f"ratio gguf-py / ours: {theirs / ours:.0f}x")


if __name__ == "__main__":
    main()
