"""Full-size model files with random weights, named as the installer names the real ones, for
benchmarks of whole presets: the real files cannot be downloaded where the benchmarks run.

Quantized weights are random block bytes with small finite scales in the type mix of the real files;
float weights are random with unit gain (std 1/sqrt(fan-in)), so that deep stacks (the VAEs, the text
encoders) neither vanish nor overflow. Shapes are the published models' (Qwen-Image 20B, Qwen2.5-VL-7B
and its vision tower, the Wan 2.1 VAE; Z-Image 6B, Qwen3-4B, the Flux VAE). Runs on the GPU (random
numbers there); the VAEs' shapes come from ComfyUI's own classes. Also, for the same graphs through
ComfyUI's own loaders, the native bf16 files under Comfy-Org's names (NATIVE_DIFFUSION,
NATIVE_TEXT_ENCODERS), written tensor by tensor.

    python bench/full_size.py --models DIR --comfyui PATH FILE...   # installer (or native) file names
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

REPO = Path(__file__).resolve().parent.parent
for _sub in ("", "tests", "bench"):
    sys.path.insert(0, str(REPO / _sub))

from dequant_bandwidth import random_blocks  # noqa: E402
from loaders.convert.recipes import IMAGE_ARCHS, LEVELS, image_recipe, uniform_recipe  # noqa: E402
from loaders.gguf.writer import write_encoded  # noqa: E402
from loaders.models.tokenizer import gguf_tokenizer_metadata  # noqa: E402
from loaders.quant.formats import FORMATS  # noqa: E402
from tiny_models import qwen_image_shapes, z_image_shapes  # noqa: E402
from tiny_text_encoders import (llm_shapes, q4_k_m, to_gguf_llm, to_gguf_mmproj,  # noqa: E402
                                vision_shapes)

QWEN_IMAGE_20B = dict(layers=60, heads=24, head_dim=128, text_dim=3584, mlp=12288, in_channels=64, out_channels=16)
Z_IMAGE_6B = dict(layers=30, refiners=2, heads=30, head_dim=128, cap_dim=2560, ffn=10240, in_channels=16)
QWEN25_VL_7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064)
VISION_7B = dict(hidden=1280, layers=32, heads=16, intermediate=3420, patch=14)
QWEN3_4B = dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728, vocab=151936)


class Random:
    device_default = "cuda"

    def __init__(self, seed: int = 0):
        self.device = self.device_default
        self.g = torch.Generator(device=self.device).manual_seed(seed)

    def floats(self, shape: tuple[int, ...], name: str) -> np.ndarray:
        if len(shape) == 1:
            base = 1.0 if "norm" in name or name.endswith(("gamma", "ln_q.weight")) else 0.0
            return (base + 0.02 * torch.randn(shape, device=self.device, generator=self.g)).float().cpu().numpy()
        fan_in = int(np.prod(shape[1:]))
        w = torch.randn(shape, device=self.device, generator=self.g) * fan_in ** -0.5
        return w.float().cpu().numpy()

    def encoded(self, name: str, shape: tuple[int, ...], qtype: T) -> tuple[np.ndarray, T]:
        if qtype == T.F32:
            return self.floats(shape, name), T.F32
        if qtype == T.F16:
            return self.floats(shape, name).astype(np.float16), T.F16
        n_blocks = int(np.prod(shape)) // FORMATS[qtype].block_size
        blocks = random_blocks(qtype, n_blocks, self.device, generator=self.g)
        return blocks.reshape(shape[0], -1).cpu().numpy(), qtype


def qwen_image(path: Path, quant: str, marker: bool = False, spec: dict = QWEN_IMAGE_20B) -> None:
    rnd = Random(0)
    recipe = image_recipe(LEVELS[quant], IMAGE_ARCHS["qwen_image"], spec["layers"])
    tensors = {n: rnd.encoded(n, s, recipe(n, s)) for n, s in qwen_image_shapes(**spec).items()}
    if marker:  # Qwen-Image-Edit-2511's, as the real files carry it
        tensors["__index_timestep_zero__"] = (np.zeros(0, np.float32), T.F32)
    write_encoded(path, tensors, "qwen_image")


def z_image(path: Path, spec: dict = Z_IMAGE_6B) -> None:
    rnd = Random(1)
    recipe = uniform_recipe(T.Q4_K)  # the installer's z_image_turbo-Q4_K.gguf
    write_encoded(path, {n: rnd.encoded(n, s, recipe(n, s)) for n, s in z_image_shapes(**spec).items()}, "lumina2")


def language_model(path: Path, arch: str, spec: dict, tokenizer: Path) -> None:
    rnd = Random(2)
    shapes = llm_shapes(**spec, qk_norm=arch == "qwen3", bias=arch != "qwen3")
    pick = q4_k_m(spec, tied=arch == "qwen3")
    tensors = {g: rnd.encoded(g, shapes[h], pick(g, shapes[h])) for g, h in to_gguf_llm({k: k for k in shapes}).items()}
    meta = {f"{arch}.block_count": spec["layers"], f"{arch}.embedding_length": spec["hidden"],
            f"{arch}.feed_forward_length": spec["intermediate"], f"{arch}.attention.head_count": spec["heads"],
            f"{arch}.attention.head_count_kv": spec["kv_heads"], f"{arch}.rope.freq_base": 1000000.0,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.context_length": 128000,
            **gguf_tokenizer_metadata(tokenizer, spec["vocab"])}
    if arch == "qwen2vl":
        meta["qwen2vl.rope.dimension_sections"] = [16, 24, 24, 0]
    else:
        meta[f"{arch}.attention.key_length"] = spec["head_dim"]
    write_encoded(path, tensors, arch, meta)


def mmproj(path: Path, spec: dict = VISION_7B, out: int = QWEN25_VL_7B["hidden"]) -> None:
    rnd = Random(3)
    weights = {n: rnd.floats(s, n) for n, s in vision_shapes(**spec, out=out).items()}
    tensors = {n: (w, T.F32) if w.ndim == 1 else (w.astype(np.float16), T.F16)
               for n, w in to_gguf_mmproj(weights).items()}
    meta = {"general.type": "mmproj", "clip.has_vision_encoder": True, "clip.projector_type": "qwen2.5vl_merger",
            "clip.use_silu": True, "clip.vision.image_size": 560, "clip.vision.patch_size": spec["patch"],
            "clip.vision.embedding_length": spec["hidden"], "clip.vision.feed_forward_length": spec["intermediate"],
            "clip.vision.projection_dim": out, "clip.vision.block_count": spec["layers"],
            "clip.vision.attention.head_count": spec["heads"], "clip.vision.attention.layer_norm_epsilon": 1e-6,
            "clip.vision.n_wa_pattern": 8, "clip.vision.image_mean": [0.48145466, 0.4578275, 0.40821073],
            "clip.vision.image_std": [0.26862954, 0.26130258, 0.27577711]}
    write_encoded(path, tensors, "clip", meta)


# ComfyUI's native files (Comfy-Org's names), for the same graphs through its own loaders: the
# diffusion models and text encoders in bf16 (UNETLoader's weight_dtype makes the fp8 runs of them).
NATIVE_DIFFUSION = {"qwen-image-2512": "qwen_image_2512_bf16.safetensors",
                    "qwen-image-edit-2511": "qwen_image_edit_2511_bf16.safetensors",
                    "z-image-turbo": "z_image_turbo_bf16.safetensors"}
NATIVE_TEXT_ENCODERS = {"qwen-image-2512": "qwen_2.5_vl_7b.safetensors", "qwen-image-edit-2511": "qwen_2.5_vl_7b.safetensors",
                        "z-image-turbo": "qwen_3_4b.safetensors"}
_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], make) -> None:
    """A safetensors file of ``shapes``, each tensor made by ``make(name, shape)`` (bf16, or fp32 for
    the 1-D ones) only when its turn comes: a 40 GB model is never whole in memory."""
    dtype = {n: torch.float32 if len(s) <= 1 else torch.bfloat16 for n, s in shapes.items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * dtype[name].itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype[name]], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, shape in shapes.items():
            tensor = make(name, shape).to(dtype[name]).contiguous().cpu()
            f.write(tensor.view(torch.uint8).numpy())


def _native(shapes: dict[str, tuple[int, ...]], seed: int):
    def write(path: Path) -> None:
        rnd = Random(seed)
        write_safetensors(path, shapes, lambda n, s: torch.from_numpy(rnd.floats(s, n)))
    return write


def native_qwen_image(path: Path, marker: bool = False, spec: dict = QWEN_IMAGE_20B) -> None:
    shapes = qwen_image_shapes(**spec)
    if marker:  # Qwen-Image-Edit-2511's
        shapes["__index_timestep_zero__"] = (0,)
    _native(shapes, 0)(path)


def _save_vae(path: Path, module: torch.nn.Module, seed: int) -> None:
    from safetensors.torch import save_file
    rnd = Random(seed)
    save_file({k: torch.from_numpy(rnd.floats(tuple(v.shape), k)) for k, v in module.state_dict().items()}, str(path))


def wan_vae(path: Path) -> None:
    import comfy.ldm.wan.vae
    with torch.device("meta"):
        vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                       temperal_downsample=[False, True, True], dropout=0.0)
    _save_vae(path, vae, 4)


def flux_vae(path: Path) -> None:
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
    config = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                  num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):
        vae = torch.nn.Module()
        vae.encoder, vae.decoder = Encoder(**config), Decoder(**config)
    _save_vae(path, vae, 5)


def folders() -> dict[str, str]:
    """File name -> its model folder: the installer's manifest's files, and the native ones."""
    manifest = json.loads((REPO / "install" / "models.json").read_text())
    out = {f["file"]: f["folder"] for f in manifest["files"].values()}
    for model_set in manifest["sets"].values():
        dm = model_set["diffusion_model"]
        out.update({q["file"]: dm["folder"] for q in dm["quants"].values()})
    out.update({n: "diffusion_models" for n in NATIVE_DIFFUSION.values()})
    out.update({n: "text_encoders" for n in NATIVE_TEXT_ENCODERS.values()})
    return out


def install(models: Path, files: list[str], comfyui: Path) -> None:
    """Write the named files (installer names) into ``models``' folders, each once."""
    sys.path.insert(0, str(comfyui))
    tokenizer = comfyui / "comfy" / "text_encoders" / "qwen25_tokenizer"
    makers = {
        "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf": lambda p: language_model(p, "qwen2vl", QWEN25_VL_7B, tokenizer),
        "mmproj-F16.gguf": mmproj,
        "Qwen3-4B-Instruct-2507-Q4_K_M.gguf": lambda p: language_model(p, "qwen3", QWEN3_4B, tokenizer),
        "qwen_image_vae.safetensors": wan_vae,
        "ae.safetensors": flux_vae,
        "z_image_turbo-Q4_K.gguf": z_image,
        "qwen_image_2512_bf16.safetensors": native_qwen_image,
        "qwen_image_edit_2511_bf16.safetensors": lambda p: native_qwen_image(p, marker=True),
        "z_image_turbo_bf16.safetensors": _native(z_image_shapes(**Z_IMAGE_6B), 1),
        # ComfyUI's Qwen2.5-VL runs its output head from the token table: no lm_head in its file.
        "qwen_2.5_vl_7b.safetensors": _native({**llm_shapes(**QWEN25_VL_7B),
                                               **vision_shapes(**VISION_7B, out=QWEN25_VL_7B["hidden"])}, 2),
        "qwen_3_4b.safetensors": _native(llm_shapes(**QWEN3_4B, qk_norm=True, bias=False), 2),
    }
    where = folders()
    for name in files:
        path = models / where[name] / name
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in makers:
            makers[name](path)
        else:  # qwen-image-2512-Q4_K_M.gguf, qwen-image-edit-2511-Q4_K_M.gguf, ...
            qwen_image(path, name.rsplit("-", 1)[1].removesuffix(".gguf"), marker="edit-2511" in name)
        print(f"wrote {path} ({os.path.getsize(path) / 2**30:.2f} GiB)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    Random.device_default = a.device
    install(Path(a.models), a.files, Path(a.comfyui))


if __name__ == "__main__":
    main()
