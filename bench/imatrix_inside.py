"""The part of imatrix.py that runs inside a started ComfyUI (see tests/comfy_runner.py)."""

import gc
import json
import os
import sys
import time

import torch

import comfy.model_management as mm
import comfy.sample
import comfy.sd
import folder_paths
from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow


def random_bf16(cfg):
    """A random Qwen-Image of cfg's sizes in bf16 (std 0.02 for matrices, 1 for vectors), made on the
    device and kept in RAM."""
    from tiny_models import qwen_image_shapes
    g = torch.Generator(device=cfg["device"]).manual_seed(0)
    return {name: (torch.randn(shape, device=cfg["device"], generator=g) * (0.02 if len(shape) > 1 else 1.0))
            .to(torch.bfloat16).cpu() for name, shape in qwen_image_shapes(**cfg["spec"]).items()}


def native_model(cfg, pkg, sd):
    """ComfyUI's own model of the weights: as its UNETLoader loads them on the GPU; for the CPU's tiny
    model through the test suite's loader, which passes the sizes (ComfyUI detects the full-size ones)."""
    if cfg["device"] == "cuda":
        return comfy.sd.load_diffusion_model_state_dict(dict(sd))
    from safetensors.torch import save_file
    from script_helpers import loaded_module
    path = os.path.join(folder_paths.get_folder_paths("diffusion_models")[0], "random.safetensors")
    save_file(sd, path)
    config, _ = pkg.loaders.models.diffusion.qwen_image_config(sd, path)
    return loaded_module(cfg, "comfy_test_nodes").TestNativeUnetLoader().load(
        "random.safetensors", "qwen_image", json.dumps(config))[0]


def sample(model, size, steps, seed):
    g = torch.Generator().manual_seed(seed)
    dim = cfg_text_dim(model)
    cond = [[torch.randn(1, 96, dim, generator=g), {}]]
    uncond = [[torch.randn(1, 96, dim, generator=g), {}]]
    latent = torch.zeros(1, 16, 1, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 4.0, "dpmpp_2m", "karras", cond, uncond, latent,
                               disable_pbar=True, seed=seed).float().cpu()


def cfg_text_dim(model):
    return model.model.diffusion_model.txt_in.in_features


def run(cfg):
    for sub in ("", "/tests", "/tests/comfy_scripts"):
        sys.path.insert(0, cfg["repo"] + sub)
    from script_helpers import loaded_module
    pkg = loaded_module(cfg, cfg["package"])
    collector = pkg.loaders.convert.imatrix.ImportanceCollector()
    sd = random_bf16(cfg)
    native = ModelSamplingAuraFlow().patch_aura(native_model(cfg, pkg, sd), 3.1)[0]
    del sd
    collecting = pkg.nodes.integration.importance.collecting(native, collector)
    start = time.perf_counter()
    for seed in range(cfg["prompts"]):
        sample(collecting, cfg["collect_size"], cfg["collect_steps"], 100 + seed)
    collect_s = time.perf_counter() - start
    imatrix = os.path.join(cfg["work"], "random.imatrix.gguf")
    collector.save(imatrix, "random conditioning")
    del collecting
    held_out = [1000 + i for i in range(cfg["held_out"])]
    reference = {seed: sample(native, cfg["size"], cfg["steps"], seed) for seed in held_out}
    ckpt = pkg.nodes.integration.export.model_checkpoint(native, "random bf16")
    files, convert_s = {}, {}
    for name, matrix in (("plain", None), ("imatrix", imatrix)):
        files[name] = os.path.join(cfg["work"], f"{name}-{cfg['level']}.gguf")
        start = time.perf_counter()
        pkg.loaders.convert.to_gguf.convert(ckpt, files[name], cfg["level"], device=cfg["device"], imatrix=matrix)
        convert_s[name] = time.perf_counter() - start
    del native, ckpt
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    unet = pkg.nodes.integration.diffusion
    rows = []
    for name, path in files.items():
        model = ModelSamplingAuraFlow().patch_aura(unet.load_gguf_unet(path, unet.AUTO), 3.1)[0]
        errors = []
        for seed in held_out:
            out = sample(model, cfg["size"], cfg["steps"], seed)
            errors.append(float((out - reference[seed]).norm() / reference[seed].norm()))
        rows.append({"file": name, "bytes": os.path.getsize(path), "convert_s": convert_s[name],
                     "latent_rel_errors": errors})
        print("imatrix:", rows[-1], flush=True)
        del model
        mm.unload_all_models()
        gc.collect()
        os.remove(path)
    return {"rows": rows, "collect_s": collect_s, "weights_collected": len(collector.sums),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
