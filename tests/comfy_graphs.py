"""ComfyUI graphs the integration tests run, and how they compare results: a sampling run of a
diffusion model, a prompt encoded by a text encoder, each through our loaders or ComfyUI's own
(the test nodes in comfy_test_nodes load the twin weights natively)."""

from __future__ import annotations

import dataclasses
import json

import torch

from loaders.models.diffusion import open_diffusion_model
from loaders.models.text_encoder import open_text_encoder

PROMPT = "A red fox 🦊 在雪地里奔跑, 35mm photo"
EDIT = "把天空变成紫色 and add a moon"


def sampling_graph(loader: dict, out: str, width: int, lora: str | None = None, reference: int = 0,
                   patches: tuple = (), steps: int = 3, control: str | None = None) -> dict:
    """A KSampler run of the model ``loader`` gives (with ``lora``, then each ComfyUI model-patching
    node of ``patches``, (class_type, inputs), applied in turn, and the ControlNet ``control`` on
    the conditioning), its final latent saved to ``out``."""
    g = {"loader": loader,
         "pos": {"class_type": "TestConditioning", "inputs": {"seed": 1, "tokens": 8, "width": width,
                                                              "reference": reference}},
         "neg": {"class_type": "TestConditioning", "inputs": {"seed": 2, "tokens": 6, "width": width,
                                                              "reference": reference}},
         "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "save": {"class_type": "TestSaveLatent", "inputs": {"samples": ["sampler", 0], "path": out}}}
    model = ["loader", 0]
    if lora:
        g["lora"] = {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": model, "lora_name": lora, "strength_model": 1.0}}
        model = ["lora", 0]
    g["shift"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": model, "shift": 3.1}}
    model = ["shift", 0]
    for i, (class_type, inputs) in enumerate(patches):
        g[f"patch{i}"] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [f"patch{i}", 0]
    positive, negative = ["pos", 0], ["neg", 0]
    if control:
        g["cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": control}}
        g["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "qwen-vae-tiny.safetensors"}}
        g["hint"] = {"class_type": "TestImage", "inputs": {"seed": 4, "width": 64, "height": 64}}
        g["apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": positive, "negative": negative, "control_net": ["cn", 0], "image": ["hint", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "vae": ["vae", 0]}}
        positive, negative = ["apply", 0], ["apply", 1]
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 7, "steps": steps, "cfg": 4.0, "sampler_name": "dpmpp_2m",
        "scheduler": "karras", "positive": positive, "negative": negative, "latent_image": ["latent", 0],
        "denoise": 1.0}}
    return g


def gguf_loader(name: str, mode: str | None = None) -> dict:
    return {"class_type": "QwenImageGGUFUnetLoader", "inputs": {"unet_name": name, **({"mode": mode} if mode else {})}}


def native_loader(models, gguf_name: str, twin: str, family: str, weight_dtype: str = "default") -> dict:
    config = open_diffusion_model(str(models / "diffusion_models" / gguf_name)).unet_config
    return {"class_type": "TestNativeUnetLoader",
            "inputs": {"unet_name": twin, "family": family, "config_json": json.dumps(config),
                       "weight_dtype": weight_dtype}}


def gguf_clip(llm: str, mmproj: str = "none") -> dict:
    return {"class_type": "QwenImageGGUFClipLoader", "inputs": {"clip_name": llm, "mmproj_name": mmproj}}


def native_clip(models, llm: str, twin: str, family: str, mmproj: str | None = None) -> dict:
    te = open_text_encoder(str(models / "text_encoders" / llm),
                           None if mmproj is None else str(models / "text_encoders" / mmproj))
    vision = json.dumps(dataclasses.asdict(te.vision)) if te.vision else ""
    return {"class_type": "TestNativeClipLoader", "inputs": {
        "clip_name": twin, "family": family, "config_json": json.dumps(te.config), "vision_json": vision}}


def encode_graph(loader: dict, out: str, images: int = 0, text: str = PROMPT) -> dict:
    g = {"clip": loader, "save": {"class_type": "TestSaveConditioning", "inputs": {"conditioning": ["enc", 0], "path": out}}}
    if images == 0:
        g["enc"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": text}}
        return g
    g["enc"] = {"class_type": "TextEncodeQwenImageEditPlus", "inputs": {"clip": ["clip", 0], "prompt": EDIT}}
    for i in range(images):
        g[f"img{i}"] = {"class_type": "TestImage", "inputs": {"seed": i, "width": 56 + 28 * i, "height": 56}}
        g["enc"]["inputs"][f"image{i + 1}"] = [f"img{i}", 0]
    return g


def short_error(error) -> str:
    if not isinstance(error, dict) or "exception_message" not in error:
        return str(error)[:3000]
    return error["exception_message"] + "".join(error.get("traceback", [])[-4:])


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and torch.isfinite(a).all()
    err = (a - b).abs().max().item()
    assert err <= 1e-4 * max(1.0, b.abs().max().item()), f"max abs difference {err}"
