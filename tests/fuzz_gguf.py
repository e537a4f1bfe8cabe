"""Seeded mutations of small valid model files, each loaded through this package inside a started
ComfyUI and run once: every case must either give a model whose forward is finite or raise a
GGUFError naming the file.

    python tests/fuzz_gguf.py --cases 20000 [--seed 0] [--workers 2]   # long runs: counts by outcome

The suite runs a short campaign (integration/test_fuzz.py). The campaign runs as a script inside ComfyUI (this
package loaded by its custom-node loader, as users get it); each case runs in a forked child with a
memory cap and an alarm, so a hang or a runaway allocation shows as its own outcome instead of
stopping the run. The forward of each kind is what a graph does first with it: a one-step sample
through the NaN guard (diffusion models), an encode (text encoders), the vision tower on an image
(mmproj), a decode (VAEs, GGUF and safetensors).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Iterable, Iterator

HERE = Path(__file__).resolve().parent

LIMIT_S = 10      # a case still running after this is a hang
ANSWER_S = 1.0    # a bad file must be refused within this (the parse and checks, not the forward)
MEMORY_CAP = 4 << 30  # address space a case may add to the started ComfyUI

# Qwen's control tokens, which ComfyUI's prompt templates use.
SPECIALS = [(t, 3) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                             "<|image_pad|>")]


def seed_files(folder: Path) -> dict[str, Path]:
    """One small valid file of each kind the loaders read (run inside ComfyUI: the VAEs are taken
    from its own classes)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as T
    from safetensors.torch import save_file

    import comfy.ldm.wan.vae
    from loaders.convert.recipes import uniform_recipe
    from loaders.gguf.writer import write_gguf
    from tiny_models import (QWEN_IMAGE, Z_IMAGE, qwen_image_recipe, qwen_image_shapes, random_weights, write_model,
                             z_image_shapes)
    from tiny_text_encoders import QWEN25VL, VISION, byte_level_tokenizer, write_llm, write_mmproj
    files = {"qwen_image": folder / "qwen.gguf", "z_image": folder / "zimage.gguf", "text_encoder": folder / "te.gguf",
             "mmproj": folder / "mmproj.gguf", "vae_gguf": folder / "vae.gguf",
             "vae_safetensors": folder / "vae.safetensors"}
    write_model(files["qwen_image"], random_weights(qwen_image_shapes(**dict(QWEN_IMAGE, layers=1)), 0),
                qwen_image_recipe(T.Q8_0), extra_tensors={"__index_timestep_zero__": np.zeros(0, np.float32)})
    write_model(files["z_image"], random_weights(z_image_shapes(**dict(Z_IMAGE, layers=1, refiners=1)), 1),
                uniform_recipe(T.Q4_K), arch="lumina2")
    spec = dict(QWEN25VL, layers=1, vocab=512)
    tokenizer = byte_level_tokenizer(["Ġa", "Ġc", "at", "Ġcat", "ph", "pho", "to", "photo", "Ġphoto"], SPECIALS,
                                     vocab_size=spec["vocab"])
    write_llm(files["text_encoder"], "qwen2vl", spec, None, None, metadata=tokenizer)
    write_mmproj(files["mmproj"], dict(VISION, layers=1), QWEN25VL["hidden"], None)
    vae = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(0)
    sd = {k: (1.0 if k.endswith("gamma") else 0.0) + 0.1 * torch.randn(v.shape, generator=g)
          for k, v in vae.state_dict().items()}
    save_file(sd, str(files["vae_safetensors"]))
    write_gguf(files["vae_gguf"], {k: v.numpy() for k, v in sd.items()}, uniform_recipe(T.F16))
    return files


def mutate(data: bytes, rng: random.Random, gguf: bool) -> bytes:
    """One of the damage kinds seen in the wild and in fuzzing: truncation, byte flips in the header or
    the data,
a huge or zero 64-bit count, a wrong value type, a swapped run of bytes, a tensor or key count one
    off."""
    b = bytearray(data)
    header = min(len(b), 4096)
    kind = rng.randrange(7 if gguf else 6)
    if kind == 0:
        return bytes(b[:rng.randrange(len(b))])
    if kind == 1:  # in the header, or anywhere (weights that hold NaN or inf must not run silently)
        reach = rng.choice([header, len(b)])
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(reach)] = rng.randrange(256)
    elif kind == 2:
        at = rng.randrange(max(1, header - 8))
        b[at:at + 8] = struct.pack("<Q", rng.choice([0, 1, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64 - 1]))
    elif kind == 3:
        at = rng.randrange(max(1, header - 4))
        b[at:at + 4] = struct.pack("<I", rng.randrange(16))
    elif kind == 4:
        at = rng.randrange(max(1, header - 4))
        b[at:at + 4] = struct.pack("<i", rng.choice([-1, 0, 1, 5, 2 ** 31 - 1]))
    elif kind == 5:
        i, j = sorted(rng.randrange(header) for _ in range(2))
        b[i:j] = bytes(reversed(b[i:j]))
    else:  # the GGUF header's tensor count (offset 8) or key count (offset 16), one off
        at = rng.choice([8, 16])
        b[at:at + 8] = struct.pack("<Q", max(0, struct.unpack_from("<Q", b, at)[0] + rng.choice([-1, 1])))
    return bytes(b)


class Forward:
    """Loading one file of a kind through the package as ComfyUI loaded it, then its first forward."""

    def __init__(self, package, seeds: dict[str, str]):
        self.pkg, self.seeds = package, seeds

    def qwen_image(self, path: str):
        return self._sample(path, "joint_attention_dim", (1, 16, 1, 8, 8))  # Wan 2.1 latents have a time axis

    def z_image(self, path: str):
        return self._sample(path, "cap_feat_dim", (1, 16, 8, 8))

    def _sample(self, path: str, context_key: str, latent_shape: tuple[int, ...]):
        import torch
        import comfy.sample
        model = self.pkg.nodes.integration.guard.add_guard(self.pkg.nodes.integration.diffusion.load_gguf_unet(path, "on the fly"))
        width = model.model.model_config.unet_config[context_key]
        context = [[torch.randn(1, 6, width), {}]]
        latent = torch.zeros(latent_shape)
        return comfy.sample.sample(model, torch.randn_like(latent), 1, 1.0, "euler", "simple", context, context,
                                   latent, seed=0, disable_pbar=True)

    def text_encoder(self, path: str):
        clip = self.pkg.nodes.integration.text_encoder.build_clip(self.pkg.loaders.models.text_encoder.open_text_encoder(path))
        return clip.encode_from_tokens(clip.tokenize("a photo of a cat"))

    def mmproj(self, path: str):
        import torch
        import comfy.model_management
        te = self.pkg.loaders.models.text_encoder.open_text_encoder(self.seeds["text_encoder"], path)
        clip = self.pkg.nodes.integration.text_encoder.build_clip(te)
        comfy.model_management.load_models_gpu([clip.patcher])
        transformer = getattr(clip.cond_stage_model, self.pkg.nodes.integration.text_encoder.ENCODER_FAMILIES[te.family].name).transformer
        return transformer.preprocess_embed({"type": "image", "data": torch.rand(1, 56, 56, 3)}, "cpu")[0]

    def vae_gguf(self, path: str):
        import torch
        return self.pkg.nodes.integration.vae.load_vae(path).decode(torch.randn(1, 16, 1, 4, 4))

    vae_safetensors = vae_gguf


def _child(forward: Forward, kind: str, path: str, conn) -> None:
    import torch
    cap = resource.getrlimit(resource.RLIMIT_AS)[0]
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    if cap == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_AS, (used + MEMORY_CAP, resource.RLIM_INFINITY))
    torch.set_num_threads(1)
    error = forward.pkg.loaders.gguf.errors.GGUFError
    start = time.perf_counter()
    try:
        out = getattr(forward, kind)(path)
        if not torch.isfinite(out).all():
            conn.send(("nonfinite forward", "", ""))
        else:
            conn.send(("ran", "", ""))
    except error as e:
        took = time.perf_counter() - start
        if os.path.basename(path) not in str(e):
            conn.send(("GGUFError without the file name", str(e), ""))
        else:
            conn.send(("GGUFError", f"{took:.2f} s: {e}" if took > ANSWER_S else "", e.reason))
    except MemoryError:
        conn.send(("memory", traceback.format_exc(limit=-3), ""))
    except BaseException as e:  # the outcome under test: anything but GGUFError is a finding
        conn.send((type(e).__name__, traceback.format_exc(limit=-4), ""))


def _outcome(proc, conn, late: bool) -> tuple[str, str, str]:
    """(outcome, detail making it a finding, the GGUFError's reason)"""
    if late:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        return "hang", "", ""
    try:
        return conn.recv()
    except EOFError:
        proc.join()
        return f"crash (exit {proc.exitcode})", "", ""
    finally:
        proc.join()


def run_cases(forward: Forward, cases: Iterable[tuple[str, bytes]], workers: int, folder: Path,
              keep: Path | None = None) -> list[tuple[str, str, str, str]]:
    """Each (kind, file content) written to a file and run in a forked child, ``workers`` at a time;
    (kind, outcome, detail, reason) for each. The files of findings are copied to ``keep``."""
    ctx = multiprocessing.get_context("fork")
    running: dict = {}  # conn -> (proc, kind, path, started)
    results = []

    def reap() -> None:
        deadline = min(started for *_, started in running.values()) + LIMIT_S
        ready = multiprocessing.connection.wait(list(running), timeout=max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        for conn, (proc, kind, path, started) in list(running.items()):
            if conn in ready or now >= started + LIMIT_S:
                outcome = _outcome(proc, conn, late=conn not in ready)
                results.append((kind, *outcome))
                conn.close()
                if keep and (outcome[0] not in ("ran", "GGUFError") or outcome[1]):
                    shutil.copy(path, keep / path.name)
                path.unlink()
                del running[conn]

    for index, (kind, content) in enumerate(cases):
        path = folder / f"case{index}-{kind}{Path(forward.seeds[kind]).suffix}"
        path.write_bytes(content)
        while len(running) >= workers:
            reap()
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(forward, kind, str(path), child))
        proc.start()
        child.close()
        running[parent] = (proc, kind, path, time.monotonic())
    while running:
        reap()
    return results


def mutated(seeds: dict[str, str], cases: int, seed: int) -> Iterator[tuple[str, bytes]]:
    kinds = list(seeds)
    originals = {k: Path(v).read_bytes() for k, v in seeds.items()}
    for index in range(cases):
        kind = kinds[index % len(kinds)]
        rng = random.Random(seed * 1_000_003 + index)
        yield kind, mutate(originals[kind], rng, seeds[kind].endswith(".gguf"))


def run(cfg: dict) -> dict:
    """Inside a started ComfyUI (comfy_runner.py): the campaign, as counts and the first findings."""
    sys.path[:0] = [str(HERE), str(HERE / "comfy_scripts"), str(HERE.parent)]
    from script_helpers import loaded_module
    package = loaded_module(cfg, cfg["package"])
    with tempfile.TemporaryDirectory() as tmp:
        seeds = {k: str(v) for k, v in seed_files(Path(tmp)).items()}
        forward = Forward(package, seeds)
        # The seeds themselves must run, or every case is meaningless.
        unmutated = run_cases(forward, ((k, Path(p).read_bytes()) for k, p in seeds.items()), cfg["workers"], Path(tmp))
        assert all(outcome == "ran" for _, outcome, _, _ in unmutated), unmutated
        keep = Path(cfg["keep"]) if cfg.get("keep") else None
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            for kind, path in seeds.items():
                shutil.copy(path, keep / f"seed-{kind}{Path(path).suffix}")
        if cfg.get("replay"):  # files kept by an earlier run, named case<N>-<kind>.<ext>
            cases = [(f.stem.split("-", 1)[1], f.read_bytes()) for f in sorted(Path(cfg["replay"]).glob("case*"))]
        else:
            cases = mutated(seeds, cfg["cases"], cfg["seed"])
        results = run_cases(forward, cases, cfg["workers"], Path(tmp), keep)
    counts = collections.Counter(f"{outcome} (slow)" if detail and outcome == "GGUFError" else outcome
                                 for _, outcome, detail, _ in results)
    by_kind = collections.Counter(f"{kind}: {outcome}" for kind, outcome, _, _ in results)
    # The faults found, without the values that vary from case to case.
    reasons = collections.Counter(f"{kind}: {re.sub(r'[0-9][0-9,.e+-]*', 'N', reason)[:90]}"
                                  for kind, outcome, _, reason in results if reason)
    findings = [r[:3] for r in results if r[1] not in ("ran", "GGUFError") or r[2]]
    return {"counts": dict(counts), "by_kind": dict(by_kind), "reasons": dict(reasons.most_common(40)),
            "findings": findings[:50]}


def campaign(cases: int, seed: int, workers: int, workdir: Path | None = None, keep: str | None = None,
             replay: str | None = None) -> dict:
    """Run the campaign in a fresh ComfyUI process (comfy_env.run_script)."""
    sys.path.insert(0, str(HERE))
    from comfy_env import PACKAGE_NAME, run_script
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        models = root / "models"
        models.mkdir(parents=True, exist_ok=True)
        return run_script(root / "comfy", models, Path(__file__), timeout=3600 * 12, cases=cases, seed=seed,
                          workers=workers, package=PACKAGE_NAME, keep=keep, replay=replay)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep", help="a folder for the files of findings (and the seeds), to reproduce them")
    ap.add_argument("--replay", help="run the case files a --keep folder holds instead of new mutations")
    a = ap.parse_args()
    start = time.perf_counter()
    result = campaign(a.cases, a.seed, a.workers, keep=a.keep and str(Path(a.keep).resolve()),
                      replay=a.replay and str(Path(a.replay).resolve()))
    done = sum(result["counts"].values())
    what = f"{done:,} cases from {a.replay}" if a.replay else f"{done:,} cases, seed {a.seed}"
    print(f"{what}, {a.workers} workers, {time.perf_counter() - start:.0f} s\n")
    print("| outcome | cases |\n|---|---|")
    for outcome, n in sorted(result["counts"].items(), key=lambda kv: -kv[1]):
        print(f"| {outcome} | {n:,} |")
    print("\n| kind: outcome | cases |\n|---|---|")
    for outcome, n in sorted(result["by_kind"].items()):
        print(f"| {outcome} | {n:,} |")
    print("\n| most frequent faults | cases |\n|---|---|")
    for reason, n in result["reasons"].items():
        print(f"| {reason} | {n:,} |")
    for kind, outcome, detail in result["findings"][:20]:
        print(f"\n{kind}: {outcome}\n{detail}")
    sys.exit(1 if result["findings"] else 0)


if __name__ == "__main__":
    main()
