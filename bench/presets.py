"""Whole presets as a user runs them, on a CUDA GPU: ComfyUI's HTTP server (main.py, as started by a
user), the preset's API workflow POSTed to /prompt until its image is saved, with full-size
random-weight files installed under the installer's names (bench/full_size.py).

    COMFYUI_PATH=../ComfyUI python bench/presets.py --runs "Qwen-Image-2512 - 20 steps:Q4_K_M:0" \\
        [--runs ...] [--images 2] [--store /tmp/full-size] [--out presets.json]

QUANT is one of the preset's diffusion-model quants, or native-bf16 / native-fp8 for the same graph
through ComfyUI's own loaders (UNETLoader with weight_dtype default / fp8_e4m3fn, CLIPLoader, VAELoader,
VAEDecode; our NaN guard left out) on bf16 files of the same shapes. The store keeps only the current
run's files (a bf16 Qwen-Image and its text encoder take 58 GB): runs of the same files go together.
A run is PRESET:QUANT:VRAM, or PRESET:QUANT:VRAM:easycache for the preset with ComfyUI's EasyCache
node (its defaults; :easycache@T with reuse threshold T) in front of each KSampler: how many steps it
skipped is read from ComfyUI's log. A last :mode=M runs our diffusion-model loader in mode M (one of
its modes, e.g. "fp8 compute") instead of the preset's. Only QUANT of the preset's diffusion model is installed, as after
`install.sh --quant QUANT` (a preset naming another quant loads it through the loader's fallback).
VRAM is the GB ComfyUI is left (started with --reserve-vram = GPU total - VRAM; 0 = the whole GPU):
the run shows whether the preset completes within it. Per run: the first image (cold: ComfyUI
started, nothing loaded) and the following ones (warm: another seed; ComfyUI's cache keeps the text
encodings, as it does for a user), as wall time from POST to the saved image; peak VRAM of the whole
GPU (nvidia-smi every 0.1 s, CUDA contexts included); peak RAM of the server process (VmHWM: what it
held resident, the pages of the memory-mapped model files it touched included).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]

from comfy_env import comfyui_path  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402
from full_size import NATIVE_DIFFUSION, NATIVE_TEXT_ENCODERS, folders  # noqa: E402

MODEL_KEYS = ("unet_name", "clip_name", "mmproj_name", "vae_name")


class PeakVRAM:
    """The highest memory in use on GPU 0 (all processes) while the block runs."""

    def __enter__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, gpu_used_mib())
            time.sleep(0.1)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def gpu_query(field: str) -> str:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[0]


def gpu_used_mib() -> int:
    return int(gpu_query("memory.used"))


def peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def model_files(prompt: dict) -> list[str]:
    """The model files the preset's loaders name."""
    return [v for node in prompt.values() for k, v in node["inputs"].items()
            if k in MODEL_KEYS and isinstance(v, str) and v != "none"]


def model_set(prompt: dict) -> tuple[str, dict]:
    """The manifest's model set of the preset's diffusion model: its name and entry."""
    manifest = json.loads((REPO / "install" / "models.json").read_text())
    names = model_files(prompt)
    for name, entry in manifest["sets"].items():
        if any(q["file"] in names for q in entry["diffusion_model"]["quants"].values()):
            return name, entry
    raise ValueError(f"no model set of the manifest has this preset's diffusion model: {names}")


def installed_files(prompt: dict, quant: str) -> tuple[list[str], str]:
    """The files the preset loads, its diffusion model replaced by the set's QUANT file."""
    quants = model_set(prompt)[1]["diffusion_model"]["quants"]
    chosen = quants[quant]["file"]
    return [chosen if any(n == q["file"] for q in quants.values()) else n for n in model_files(prompt)], chosen


NATIVE = {"native-bf16": "default", "native-fp8": "fp8_e4m3fn"}


def with_native(prompt: dict, weight_dtype: str) -> tuple[dict, list[str], str]:
    """The preset's graph through ComfyUI's own loaders on the native files of its model set (our NaN
    guard left out: its consumers read its model); the files it loads and its diffusion model's."""
    set_name, _ = model_set(prompt)
    unet, text_encoder = NATIVE_DIFFUSION[set_name], NATIVE_TEXT_ENCODERS[set_name]
    out = json.loads(json.dumps(prompt))
    guards = {i: node["inputs"]["model"] for i, node in out.items() if node["class_type"] == "QwenImageGGUFNaNGuard"}
    for i in guards:
        del out[i]
    files = [unet, text_encoder]
    for node in out.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and value[0] in guards:
                node["inputs"][key] = guards[value[0]]
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "QwenImageGGUFUnetLoader":
            node.update(class_type="UNETLoader", inputs={"unet_name": unet, "weight_dtype": weight_dtype})
        elif kind == "QwenImageGGUFClipLoader":
            node.update(class_type="CLIPLoader", inputs={
                "clip_name": text_encoder, "type": "lumina2" if set_name == "z-image-turbo" else "qwen_image"})
        elif kind == "QwenImageGGUFVAELoader":
            node.update(class_type="VAELoader", inputs={"vae_name": inputs["vae_name"]})
            files.append(inputs["vae_name"])
        elif kind == "QwenImageGGUFVAEDecode":
            node.update(class_type="VAEDecode", inputs={"samples": inputs["samples"], "vae": inputs["vae"]})
        elif kind.startswith("QwenImageGGUF"):
            raise ValueError(f"no native twin for {kind}")
    return out, files, unet


def keep_only(store: Path, files: list[str]) -> None:
    """Remove from the store every model file but ``files`` (the disk holds one run's at a time)."""
    for path in store.rglob("*"):
        if path.is_file() and path.name not in files:
            path.unlink()


def with_seed(prompt: dict, seed: int) -> dict:
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        if "seed" in node["inputs"]:
            node["inputs"]["seed"] = seed
    return out


def with_easycache(prompt: dict, threshold: float = 0.2) -> dict:
    """The prompt with ComfyUI's EasyCache node (its default settings, but ``threshold``) on each
    KSampler's model."""
    out = json.loads(json.dumps(prompt))
    for node_id, node in list(out.items()):
        if node["class_type"] == "KSampler":
            cache_id = f"easycache{node_id}"
            out[cache_id] = {"class_type": "EasyCache", "inputs": {
                "model": node["inputs"]["model"], "reuse_threshold": threshold, "start_percent": 0.15,
                "end_percent": 0.95, "verbose": False}}
            node["inputs"]["model"] = [cache_id, 0]
    return out


def with_mode(prompt: dict, mode: str) -> dict:
    """The prompt with our diffusion-model loaders set to ``mode``."""
    out = json.loads(json.dumps(prompt))
    loaders = [n for n in out.values() if n["class_type"] == "QwenImageGGUFUnetLoader"]
    if not loaders:
        raise ValueError("mode= asks for our diffusion-model loader, which this graph does not have")
    for node in loaders:
        node["inputs"]["mode"] = mode
    return out


def run_preset(preset: str, quant: str, vram_gb: float, images: int, store: Path, work: Path,
               easycache: float | None = None, mode: str | None = None) -> dict:
    prompt = json.loads((REPO / "workflows" / "api" / f"{preset}.json").read_text())
    if quant in NATIVE:
        prompt, files, model = with_native(prompt, NATIVE[quant])
    else:
        files, model = installed_files(prompt, quant)
    if easycache is not None:
        prompt = with_easycache(prompt, easycache)
    if mode:
        prompt = with_mode(prompt, mode)
    keep_only(store, files)
    start = time.perf_counter()
    # In a process of its own, so that this one holds no CUDA context while it measures the GPU.
    subprocess.run([sys.executable, str(REPO / "bench" / "full_size.py"), "--models", str(store), "--comfyui",
                    str(comfyui_path()), *files], check=True)
    made = time.perf_counter() - start
    # A models folder holding only this run's files (links into the store).
    models = work / "models"
    shutil.rmtree(models, ignore_errors=True)
    where = folders()
    for name in files:
        (models / where[name]).mkdir(parents=True, exist_ok=True)
        (models / where[name] / name).symlink_to(store / where[name] / name)
    row = {"preset": preset + ("" if easycache is None else f" + EasyCache {easycache:g}"),
           "quant": quant + (f", {mode}" if mode else ""),
           "file": model,
           "vram_limit_gb": vram_gb or None,
           "files_written_s": round(made, 1), "images": []}
    total_mib = int(gpu_query("memory.total"))
    args = ["--reserve-vram", f"{total_mib / 1024 - vram_gb:.2f}"] if vram_gb else []
    # The API needs no front end; an empty root keeps the server from requiring its package.
    (work / "front-end").mkdir(parents=True, exist_ok=True)
    args += ["--front-end-root", str(work / "front-end")]
    (work / "input").mkdir(parents=True, exist_ok=True)
    for image in (REPO / "workflows" / "input").iterdir():
        shutil.copy(image, work / "input" / image.name)
    before = gpu_used_mib()
    with PeakVRAM() as peak, ComfyServer(work, models, tuple(args), device_args=()) as server:
        for i in range(images):
            t0 = time.perf_counter()
            entry = server.run(with_seed(prompt, 42 + i), timeout=1200, poll=0.05)
            seconds = time.perf_counter() - t0
            ok = entry.get("status", {}).get("completed", False)
            row["images"].append(round(seconds, 2))
            if not ok:
                errors = [m for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
                row["error"] = (errors[0][1].get("exception_message", "")[:500] if errors else str(entry)[:500])
                break
        row["peak_rss_gib"] = round(peak_rss_gib(server.proc.pid), 1)
        log = server.server_log()
    row["peak_vram_gib"] = round(peak.peak / 1024, 1)
    row["vram_before_gib"] = round(before / 1024, 1)
    row["ok"] = "error" not in row
    # Our loaders' lines (copies freed among them), the VAE's tiling, ours or ComfyUI's (another cost
    # per image), and errors.
    row["log_tail"] = "\n".join(line for line in log.splitlines()
                                if "GGUF" in line or "tile" in line or "error" in line.lower())[-3000:]
    # EasyCache's own count, per sampling: "EasyCache - skipped 3/20 steps (1.18x speedup)."
    row["cache_skipped"] = re.findall(r"EasyCache - skipped (\d+/\d+) steps", log)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", action="append", required=True, help="PRESET:QUANT:VRAM_GB[:easycache[@T]][:mode=M] (0 = the whole GPU)")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--store", default="/tmp/full-size-models")
    ap.add_argument("--work", default="/tmp/preset-bench")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    gpu = gpu_query("name")
    rows = []
    for spec in a.runs:
        spec, _, mode = spec.partition(":mode=")
        spec, cached, threshold = spec.partition(":easycache")
        easycache = float(threshold.removeprefix("@") or 0.2) if cached else None
        preset, quant, vram = spec.rsplit(":", 2)
        work = Path(a.work) / f"run{len(rows)}"
        shutil.rmtree(work, ignore_errors=True)
        row = run_preset(preset, quant, float(vram), a.images, Path(a.store), work, easycache, mode)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
        if not row["ok"]:
            print(row["log_tail"], flush=True)
        else:  # what costs time per image beyond sampling, if it happened
            print("\n".join(line for line in row["log_tail"].splitlines() if "copies" in line or "tile" in line),
                  flush=True)
        if a.out:  # after every run: a time limit that cuts the last one keeps the others
            Path(a.out).write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=1))
    print(f"\n{gpu}, ComfyUI with its default loader (dynamic VRAM on NVIDIA)\n")
    print("| preset | diffusion model | ComfyUI given | first image (cold) | next images (warm) | peak VRAM | peak RAM "
          "| steps EasyCache skipped |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        given = f"{r['vram_limit_gb']:g} GB" if r["vram_limit_gb"] else "whole GPU"
        cold = f"{r['images'][0]:.1f} s" if r["images"] else "-"
        warm = ", ".join(f"{s:.1f}" for s in r["images"][1:]) + " s" if len(r["images"]) > 1 else "-"
        if not r["ok"]:
            cold, warm = "failed", r["error"][:80]
        skipped = ", ".join(r["cache_skipped"]) or "-"
        print(f"| {r['preset']} | {r['quant']} | {given} | {cold} | {warm} | {r['peak_vram_gib']} GiB | "
              f"{r['peak_rss_gib']} GiB | {skipped} |")


if __name__ == "__main__":
    main()
