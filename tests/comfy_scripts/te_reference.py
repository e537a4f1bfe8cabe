"""Runs inside a started ComfyUI on a GPU: a full-size Qwen2.5-VL-7B text encoder (random weights,
llama.cpp's Q4_K_M mix) with a full-size mmproj, against a reference on the same values.

mode "prepare" writes the two GGUF files and the reference conditionings: ComfyUI's own encoder in
fp32 on the CPU with its classic loader, fed the files' values exactly (none of our code, no bf16, no
GPU). mode "check" builds our CLIP from the files under whatever loader this ComfyUI runs and
returns each case's relative difference to the reference. Cases: CLIPTextEncode's text path and
TextEncodeQwenImageEditPlus with one and with two images (the vision tower, through the mmproj).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import comfy.model_management
import comfy.sd
from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus
from script_helpers import loaded_module

PROMPT = "把天空变成紫色, add a crescent moon and a red lantern by the door"
# Qwen2.5-VL-7B's vision tower and its merger into the 3584-wide language model.
VISION = dict(hidden=1280, layers=32, heads=16, intermediate=3420, patch=14)


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.rand(1, 224, 280, 3, generator=g), torch.rand(1, 196, 196, 3, generator=g)]


def encode(clip) -> dict[str, torch.Tensor]:
    img = images()
    cases = {"text": lambda: clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT)),
             "edit, 1 image": lambda: TextEncodeQwenImageEditPlus.execute(clip, PROMPT, image1=img[0]).result[0],
             "edit, 2 images": lambda: TextEncodeQwenImageEditPlus.execute(clip, PROMPT, image1=img[0],
                                                                           image2=img[1]).result[0]}
    return {name: run()[0][0].float().cpu().contiguous() for name, run in cases.items()}


def vision_weights(cfg) -> tuple[dict, dict]:
    """The mmproj's tensors (llama.cpp names, F16 with F32 norms and biases) and their exact values
    under ComfyUI's names."""
    for sub in ("/tests",):
        sys.path.insert(0, cfg["repo"] + sub)
    from tiny_text_encoders import to_gguf_mmproj, vision_shapes
    g = torch.Generator(device=cfg["device"]).manual_seed(1)
    exact = {}
    for name, shape in vision_shapes(**VISION, out=cfg["spec"]["hidden"]).items():
        if len(shape) == 1:
            w = (1.0 if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")) else 0.0) \
                + 0.02 * torch.randn(shape, device=cfg["device"], generator=g)
            exact[name] = w.float().cpu()
        else:
            fan_in = int(np.prod(shape[1:]))
            w = torch.randn(shape, device=cfg["device"], generator=g) / fan_in ** 0.5
            exact[name] = w.half().float().cpu()
    gguf = to_gguf_mmproj({k: v.numpy() for k, v in exact.items()})
    return gguf, exact


def write_mmproj(path, tensors, spec):
    from gguf import GGMLQuantizationType as T
    from loaders.gguf.writer import write_gguf
    meta = {"general.type": "mmproj", "clip.has_vision_encoder": True, "clip.projector_type": "qwen2.5vl_merger",
            "clip.use_silu": True, "clip.vision.image_size": 560, "clip.vision.patch_size": VISION["patch"],
            "clip.vision.embedding_length": VISION["hidden"], "clip.vision.feed_forward_length": VISION["intermediate"],
            "clip.vision.projection_dim": spec["hidden"], "clip.vision.block_count": VISION["layers"],
            "clip.vision.attention.head_count": VISION["heads"], "clip.vision.attention.layer_norm_epsilon": 1e-6,
            "clip.vision.n_wa_pattern": 8,
            "clip.vision.image_mean": [0.48145466, 0.4578275, 0.40821073],
            "clip.vision.image_std": [0.26862954, 0.26130258, 0.27577711]}
    write_gguf(path, tensors, lambda n, s: T.F32 if len(s) == 1 else T.F16, arch="clip", metadata=meta)


def prepare(cfg, pkg) -> dict:
    sys.path.insert(0, cfg["repo"] + "/bench")
    from text_encoder_inside import random_weights, write_gguf
    ours, _, exact = random_weights(cfg, pkg)
    write_gguf(cfg["gguf"], ours, cfg["spec"], Path(cfg["comfyui"]) / "comfy" / "text_encoders" / "qwen25_tokenizer")
    del ours
    vision, vision_exact = vision_weights(cfg)
    write_mmproj(cfg["mmproj"], vision, cfg["spec"])
    clip = comfy.sd.load_text_encoder_state_dicts(
        [{**exact, **vision_exact}], clip_type=comfy.sd.CLIPType.QWEN_IMAGE, disable_dynamic=True,
        model_options={"load_device": torch.device("cpu"), "offload_device": torch.device("cpu"),
                       "initial_device": torch.device("cpu"), "dtype": torch.float32})
    reference = encode(clip)
    save_file(reference, cfg["reference"])
    return {name: list(t.shape) for name, t in reference.items()}


def check(cfg, pkg) -> dict:
    """Ours as users run it (bf16 compute on the GPU), and ours computing in fp32: the first within bf16
    rounding of the reference, the second within fp32 rounding (a wrong weight, mask or rope would
    show in both)."""
    reference = load_file(cfg["reference"])
    te = pkg.loaders.models.text_encoder.open_text_encoder(cfg["gguf"], cfg["mmproj"])
    out = {"device": str(comfy.model_management.get_torch_device())}
    bf16_rule = pkg.nodes.integration.text_encoder.compute_dtype
    for label, rule in (("bf16", bf16_rule), ("fp32", lambda device: torch.float32)):
        pkg.nodes.integration.text_encoder.compute_dtype = rule
        try:
            clip = pkg.nodes.integration.text_encoder.build_clip(te)
            got = encode(clip)
        finally:
            pkg.nodes.integration.text_encoder.compute_dtype = bf16_rule
        out["patcher"] = type(clip.patcher).__name__
        for name, ref in reference.items():
            g = got[name]
            out[f"{name}, {label}"] = ((g - ref).norm() / ref.norm()).item() if g.shape == ref.shape \
                else f"shape {list(g.shape)}"
        del clip
        comfy.model_management.unload_all_models()
    return out


def run(cfg):
    pkg = loaded_module(cfg, cfg["package"])
    return prepare(cfg, pkg) if cfg["mode"] == "prepare" else check(cfg, pkg)
