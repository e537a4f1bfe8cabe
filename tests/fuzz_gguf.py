"""Seeded mutations of small valid GGUF files, each opened by the reader and by the library's loader
of its kind: every case must either load or raise GGUFError naming the file.

    python tests/fuzz_gguf.py --cases 20000 [--seed 0] [--workers 2]   # long runs: counts by outcome

The suite runs a short campaign (test_fuzz.py). Each case runs in a child process with a memory cap and
an alarm, so a hang or a runaway allocation shows as its own outcome instead of stopping the run.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

LIMIT_S = 10
MEMORY_CAP = 4 << 30


def seed_files(folder: Path) -> dict[str, Path]:
    """One small valid file of each kind the loaders read."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from loaders.writer import uniform_recipe, write_gguf
    from tiny_models import QWEN_IMAGE, qwen_image_recipe, qwen_image_shapes, random_weights, write_model
    from tiny_text_encoders import QWEN25VL, VISION, write_llm, write_mmproj
    small = dict(QWEN_IMAGE, layers=1)
    files = {"diffusion": folder / "dm.gguf", "text_encoder": folder / "te.gguf", "mmproj": folder / "mmproj.gguf",
             "vae": folder / "vae.gguf"}
    write_model(files["diffusion"], random_weights(qwen_image_shapes(**small), 0), qwen_image_recipe(T.Q8_0),
                extra_tensors={"__index_timestep_zero__": np.zeros(0, np.float32)})
    write_llm(files["text_encoder"], "qwen2vl", dict(QWEN25VL, layers=1, vocab=512), None, None)
    write_mmproj(files["mmproj"], dict(VISION, layers=1), QWEN25VL["hidden"], None)
    vae = {"decoder.conv_in.weight": np.zeros((32, 16, 3, 3, 3), np.float32),
           "decoder.middle.0.residual.0.gamma": np.ones((32, 1, 1, 1), np.float32)}
    write_gguf(files["vae"], vae, uniform_recipe(T.F16))
    return files


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of the damage kinds seen in the wild and in fuzzing: truncation, byte flips in the header,
    a huge or zero 64-bit count, a wrong value type, a swapped run of bytes."""
    b = bytearray(data)
    header = min(len(b), 4096)
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(b[:rng.randrange(len(b))])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(header)] = rng.randrange(256)
    elif kind == 2:
        at = rng.randrange(max(1, header - 8))
        b[at:at + 8] = struct.pack("<Q", rng.choice([0, 1, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64 - 1]))
    elif kind == 3:
        at = rng.randrange(max(1, header - 4))
        b[at:at + 4] = struct.pack("<I", rng.randrange(16))
    elif kind == 4:
        at = rng.randrange(max(1, header - 4))
        b[at:at + 4] = struct.pack("<i", rng.choice([-1, 0, 1, 5, 2 ** 31 - 1]))
    else:
        i, j = sorted(rng.randrange(header) for _ in range(2))
        b[i:j] = bytes(reversed(b[i:j]))
    return bytes(b)


def load(kind: str, path: str, seeds: dict[str, str]) -> None:
    from loaders.diffusion import open_diffusion_model
    from loaders.gguf_file import GGUFFile
    from loaders.state_dict import load_state_dict
    from loaders.text_encoder import open_text_encoder
    from loaders.vae import open_vae
    gguf = GGUFFile(path)
    for name in gguf.tensors:
        gguf.raw(name)
    if kind == "diffusion":
        open_diffusion_model(path)
    elif kind == "text_encoder":
        open_text_encoder(path)
    elif kind == "mmproj":
        open_text_encoder(seeds["text_encoder"], path)
    else:
        load_state_dict(gguf)
        open_vae(path)


def _child(kind: str, path: str, seeds: dict[str, str], conn) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    from loaders.errors import GGUFError
    try:
        load(kind, path, seeds)
        conn.send(("loaded", ""))
    except GGUFError as e:
        conn.send(("GGUFError", "" if os.path.basename(path) in str(e) else f"no file name: {e}"))
    except MemoryError:
        conn.send(("memory", traceback.format_exc(limit=-3)))
    except BaseException as e:  # the outcome under test: anything but GGUFError is a finding
        conn.send((type(e).__name__, traceback.format_exc(limit=-3)))


def _import_library() -> None:
    import loaders.diffusion, loaders.text_encoder, loaders.vae  # noqa: F401,E401


def run_case(args: tuple[int, int, str, dict[str, str], str]) -> tuple[str, str, str]:
    seed, index, kind, seeds, folder = args
    rng = random.Random(seed * 1_000_003 + index)
    data = mutate(Path(seeds[kind]).read_bytes(), rng)
    path = Path(folder) / f"case{index}-{kind}.gguf"
    path.write_bytes(data)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(kind, str(path), seeds, child))
    proc.start()
    proc.join(LIMIT_S)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        outcome = ("hang", "")
    elif parent.poll():
        outcome = parent.recv()
    else:
        outcome = (f"crash (exit {proc.exitcode})", "")
    path.unlink()
    return kind, *outcome


def campaign(cases: int, seed: int, workers: int) -> tuple[collections.Counter, list[tuple[str, str, str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        seeds = {k: str(v) for k, v in seed_files(Path(tmp)).items()}
        kinds = list(seeds)
        jobs = [(seed, i, kinds[i % len(kinds)], seeds, tmp) for i in range(cases)]
        # Spawned workers (a fork of a process whose threads hold locks can deadlock), each importing
        # the library once, then forking a child per case.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_import_library) as pool:
            results = list(pool.map(run_case, jobs, chunksize=16))
    counts = collections.Counter(outcome if outcome in ("loaded", "GGUFError") and not detail
                                 else f"{outcome}" for _, outcome, detail in results)
    findings = [r for r in results if r[1] not in ("loaded", "GGUFError") or r[2]]
    return counts, findings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    counts, findings = campaign(a.cases, a.seed, a.workers)
    print("| outcome | cases |\n|---|---|")
    for outcome, n in counts.most_common():
        print(f"| {outcome} | {n:,} |")
    for kind, outcome, detail in findings[:20]:
        print(f"\n{kind}: {outcome}\n{detail}")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
