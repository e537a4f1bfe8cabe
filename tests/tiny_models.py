"""Tiny random models with the real architectures' tensor names, written as GGUF by our own code.

Widths are multiples of 256 so K-quants apply as in real files; three blocks so city96's recipe
has a first, a middle and a last block. Each GGUF has a float32 safetensors twin holding exactly the
values the GGUF decodes to, so a model loaded natively from the twin must match ours.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from gguf import GGMLQuantizationType as T, quants
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from loaders.convert.recipes import IMAGE_ARCHS, LEVELS, Recipe, image_recipe, uniform_recipe
from loaders.gguf.writer import encode, write_gguf

QWEN_IMAGE = dict(layers=3, heads=4, head_dim=64, text_dim=256, mlp=1024, in_channels=64, out_channels=16)
Z_IMAGE = dict(layers=3, refiners=2, heads=4, head_dim=64, cap_dim=256, ffn=768, in_channels=16)


def qwen_image_shapes(layers, heads, head_dim, text_dim, mlp, in_channels, out_channels) -> dict:
    d = heads * head_dim
    s = {
        "time_text_embed.timestep_embedder.linear_1.weight": (d, 256),
        "time_text_embed.timestep_embedder.linear_1.bias": (d,),
        "time_text_embed.timestep_embedder.linear_2.weight": (d, d),
        "time_text_embed.timestep_embedder.linear_2.bias": (d,),
        "txt_norm.weight": (text_dim,),
        "img_in.weight": (d, in_channels), "img_in.bias": (d,),
        "txt_in.weight": (d, text_dim), "txt_in.bias": (d,),
        "norm_out.linear.weight": (2 * d, d), "norm_out.linear.bias": (2 * d,),
        "proj_out.weight": (out_channels * 4, d), "proj_out.bias": (out_channels * 4,),
    }
    for i in range(layers):
        b = f"transformer_blocks.{i}."
        for side in ("img", "txt"):
            s[f"{b}{side}_mod.1.weight"], s[f"{b}{side}_mod.1.bias"] = (6 * d, d), (6 * d,)
            s[f"{b}{side}_mlp.net.0.proj.weight"], s[f"{b}{side}_mlp.net.0.proj.bias"] = (mlp, d), (mlp,)
            s[f"{b}{side}_mlp.net.2.weight"], s[f"{b}{side}_mlp.net.2.bias"] = (d, mlp), (d,)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            s[f"{b}attn.{norm}.weight"] = (head_dim,)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            s[f"{b}attn.{proj}.weight"], s[f"{b}attn.{proj}.bias"] = (d, d), (d,)
    return s


def z_image_shapes(layers, refiners, heads, head_dim, cap_dim, ffn, in_channels) -> dict:
    d = heads * head_dim
    s = {
        "x_pad_token": (1, d), "cap_pad_token": (1, d),
        "x_embedder.weight": (d, in_channels * 4), "x_embedder.bias": (d,),
        "t_embedder.mlp.0.weight": (min(d, 1024), 256), "t_embedder.mlp.0.bias": (min(d, 1024),),
        "t_embedder.mlp.2.weight": (256, min(d, 1024)), "t_embedder.mlp.2.bias": (256,),
        "cap_embedder.0.weight": (cap_dim,), "cap_embedder.1.weight": (d, cap_dim), "cap_embedder.1.bias": (d,),
        "final_layer.linear.weight": (in_channels * 4, d), "final_layer.linear.bias": (in_channels * 4,),
        "final_layer.adaLN_modulation.1.weight": (d, min(d, 256)), "final_layer.adaLN_modulation.1.bias": (d,),
    }
    blocks = [f"layers.{i}." for i in range(layers)]
    blocks += [f"{kind}.{i}." for kind in ("noise_refiner", "context_refiner") for i in range(refiners)]
    for b in blocks:
        s[f"{b}attention.qkv.weight"] = (3 * d, d)
        s[f"{b}attention.out.weight"] = (d, d)
        s[f"{b}attention.q_norm.weight"] = s[f"{b}attention.k_norm.weight"] = (head_dim,)
        s[f"{b}feed_forward.w1.weight"] = s[f"{b}feed_forward.w3.weight"] = (ffn, d)
        s[f"{b}feed_forward.w2.weight"] = (d, ffn)
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            s[f"{b}{norm}.weight"] = (d,)
        if not b.startswith("context_refiner"):
            s[f"{b}adaLN_modulation.0.weight"] = (4 * d, min(d, 256))
            s[f"{b}adaLN_modulation.0.bias"] = (4 * d,)
    return s


def random_weights(shapes: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm_q.weight", "norm_k.weight",
                          "_q.weight", "_k.weight", "cap_embedder.0.weight", "ln_q.weight")) and len(shape) == 1:
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif len(shape) == 1 or name.endswith("pad_token"):
            out[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    return out


def decoded(weights: dict[str, np.ndarray], chosen: dict[str, T]) -> dict[str, np.ndarray]:
    """What each tensor decodes to after being stored as its chosen type (the safetensors twin)."""
    out = {}
    for name, array in weights.items():
        qtype = chosen[name]
        if qtype == T.F32:
            out[name] = array
        elif qtype == T.F16:
            out[name] = array.astype(np.float16).astype(np.float32)
        else:
            out[name] = quants.dequantize(encode(array, qtype), qtype).reshape(array.shape).astype(np.float32)
    return out


def write_model(path, weights: dict, recipe: Recipe, arch: str | None = "qwen_image", prefix: str = "",
                twin: str | None = None, extra_tensors: dict | None = None) -> dict[str, T]:
    tensors = {prefix + k: v for k, v in weights.items()}
    tensors.update(extra_tensors or {})
    # The type mix follows the model's own names, whatever prefix the file carries.
    chosen = write_gguf(path, tensors, lambda name, shape: recipe(name.removeprefix(prefix), shape), arch=arch)
    if twin:
        chosen_plain = {k[len(prefix):]: v for k, v in chosen.items() if k.startswith(prefix)}
        save_file({**decoded(weights, chosen_plain), **{k.removeprefix(prefix): v for k, v in (extra_tensors or {}).items()}},
                  twin)
    return chosen


def qwen_image_recipe(bulk: T = T.Q4_K) -> Recipe:
    if bulk == T.Q4_K:
        return image_recipe(LEVELS["Q4_K_M"], IMAGE_ARCHS["qwen_image"], QWEN_IMAGE["layers"])
    return uniform_recipe(bulk)


LORA_TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_v",
                "transformer_blocks.1.img_mlp.net.2", "img_in")


def write_lora(path, weights: dict, rank: int = 4, seed: int = 5) -> None:
    """A LoRA in ComfyUI's key names for a few layers of the Qwen-Image ``weights``."""
    rng = np.random.default_rng(seed)
    lora = {}
    for target in LORA_TARGETS:
        out_f, in_f = weights[target + ".weight"].shape
        lora[f"diffusion_model.{target}.lora_up.weight"] = (0.5 * rng.standard_normal((out_f, rank))).astype(np.float32)
        lora[f"diffusion_model.{target}.lora_down.weight"] = (rng.standard_normal((rank, in_f)) / np.sqrt(in_f)).astype(np.float32)
        lora[f"diffusion_model.{target}.alpha"] = np.array(float(rank), dtype=np.float32)
    save_file(lora, str(path))


def tiny_qwen(tmp_path, dtype: str, extra: dict | None = None) -> tuple:
    """A tiny Qwen-Image checkpoint stored in ``dtype`` (or Comfy-Org's fp8 layouts) and the float32
    values it holds."""
    weights = {k: torch.from_numpy(v) for k, v in random_weights(qwen_image_shapes(**QWEN_IMAGE), 0).items()}
    stored, values, layers = {}, {}, {}
    for name, w in weights.items():
        if dtype.startswith("fp8") and w.ndim == 2:
            scale = w.abs().max() / 448
            q = (w / scale).to(torch.float8_e4m3fn)
            stored[name] = q
            if dtype == "fp8 scaled":
                stored[name.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            elif dtype == "fp8 metadata":  # the newer layout, described in the file's metadata
                stored[name.removesuffix("weight") + "weight_scale"] = scale.reshape(())
                layers[name.removesuffix(".weight")] = {"format": "float8_e4m3fn"}
            else:  # the newer layout, described per layer
                stored[name.removesuffix("weight") + "weight_scale"] = scale.reshape(())
                stored[name.removesuffix("weight") + "comfy_quant"] = torch.tensor(
                    list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
                stored[name.removesuffix("weight") + "input_scale"] = torch.tensor(1.5)
            values[name] = q.float() * scale
        else:
            stored[name] = w.to({"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32))
            values[name] = stored[name].float()
    if dtype == "fp8 scaled":
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    stored.update(extra or {})
    path = tmp_path / f"qwen-{dtype.replace(' ', '-')}.safetensors"
    save_torch(stored, str(path), metadata={"_quantization_metadata": json.dumps({"layers": layers})} if layers else None)
    return path, values
