"""The VAE loader, decode checks and the NaN guard in real ComfyUI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file

from comfy_env import PACKAGE_NAME, REPO, requires_comfyui, run_prompts, run_script
from loaders.convert.recipes import uniform_recipe
from loaders.gguf.writer import write_gguf
from tiny_models import (QWEN_IMAGE, Z_IMAGE, decoded, qwen_image_recipe, qwen_image_shapes, random_weights,
                         write_model, z_image_shapes)

pytestmark = requires_comfyui

DROPPED = "decoder.upsamples.4.residual.2.weight"
SHORTENED = "decoder.middle.1.to_qkv.weight"


def vae_recipe(qtype: T):
    def pick(name, shape):
        if len(shape) == 1:
            return T.F32
        if qtype == T.Q8_0:
            return T.Q8_0 if shape[-1] % 32 == 0 else T.F16
        return qtype
    return pick


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_models")
    vae = root / "vae"
    dm = root / "diffusion_models"
    vae.mkdir()
    dm.mkdir()
    run_script(tmp_path_factory.mktemp("make_vae"), root, REPO / "tests" / "comfy_scripts" / "make_wan_vae.py",
               dim=16, seed=0, out=str(vae / "qwen-vae-tiny.safetensors"))
    weights = load_numpy(str(vae / "qwen-vae-tiny.safetensors"))
    for qtype in (T.F16, T.BF16, T.Q8_0):
        chosen = write_gguf(vae / f"qwen-vae-tiny-{qtype.name}.gguf", weights, vae_recipe(qtype))
        save_numpy(decoded(weights, chosen) if qtype != T.BF16 else
                   {k: np.asarray(torch.from_numpy(v).to(torch.bfloat16).float()) if chosen[k] == T.BF16 else v
                    for k, v in weights.items()},
                   str(vae / f"qwen-vae-tiny-{qtype.name}-twin.safetensors"))
    # Damaged VAEs: a tensor ComfyUI reads a size from, another tensor, a tensor of the wrong shape.
    head = dict(weights)
    del head["decoder.head.2.weight"]
    save_numpy(head, str(vae / "qwen-vae-no-head.safetensors"))
    missing = dict(weights)
    del missing[DROPPED]
    write_gguf(vae / "qwen-vae-missing.gguf", missing, vae_recipe(T.F16))
    misshaped = dict(weights, **{SHORTENED: weights[SHORTENED][:-1]})
    save_numpy(misshaped, str(vae / "qwen-vae-misshaped.safetensors"))
    run_script(tmp_path_factory.mktemp("make_flux"), root, REPO / "tests" / "comfy_scripts" / "make_flux_vae.py",
               ch=32, seed=0, out=str(vae / "flux-decoder-only.safetensors"))
    qwen = random_weights(qwen_image_shapes(**QWEN_IMAGE), seed=0)
    overflow = dict(qwen, **{"img_in.weight": qwen["img_in.weight"] * 3e4})
    write_model(dm / "qwen-overflows-fp16.gguf", overflow, qwen_image_recipe())
    broken = dict(qwen)
    broken["transformer_blocks.1.attn.to_k.weight"] = qwen["transformer_blocks.1.attn.to_k.weight"].copy()
    broken["transformer_blocks.1.attn.to_k.weight"][3, :32] = np.nan
    write_model(dm / "qwen-nan-weight.gguf", broken, uniform_recipe(T.Q8_0))
    write_model(dm / "z-image-tiny.gguf", random_weights(z_image_shapes(**Z_IMAGE), 1), uniform_recipe(T.Q4_K),
                arch="lumina2")
    return root


def decode_graph(loader: dict, out: str, node: str = "VAEDecode", size: int = 16, **extra) -> dict:
    return {"vae": loader, "latent": {"class_type": "TestLatent", "inputs": {"seed": 0, "width": size, "height": size}},
            "dec": {"class_type": node, "inputs": {"samples": ["latent", 0], "vae": ["vae", 0], **extra}},
            "save": {"class_type": "TestSaveImage", "inputs": {"images": ["dec", 0], "path": out}}}


def ours(name):
    return {"class_type": "QwenImageGGUFVAELoader", "inputs": {"vae_name": name, "tile_size": 512}}


def native(name):
    return {"class_type": "VAELoader", "inputs": {"vae_name": name}}


def sample_graph(unet: str, out: str, force: str | None = None, guard: bool = True) -> dict:
    g = {"unet": {"class_type": "QwenImageGGUFUnetLoader", "inputs": {"unet_name": unet}},
         "pos": {"class_type": "TestConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 256}},
         "neg": {"class_type": "TestConditioning", "inputs": {"seed": 2, "tokens": 6, "width": 256}},
         "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "save": {"class_type": "TestSaveLatent", "inputs": {"samples": ["sampler", 0], "path": out}}}
    model = ["unet", 0]
    if force:
        g["force"] = {"class_type": "TestForceDtype", "inputs": {"model": model, "dtype": force}}
        model = ["force", 0]
    if guard:
        g["guard"] = {"class_type": "QwenImageGGUFNaNGuard", "inputs": {"model": model}}
        model = ["guard", 0]
    g["shift"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": model, "shift": 3.1}}
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": ["shift", 0], "seed": 7, "steps": 3, "cfg": 4.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    return g


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("vae_run")
    cases = {
        "st_ours": decode_graph(ours("qwen-vae-tiny.safetensors"), str(work / "st_ours.st")),
        "st_native": decode_graph(native("qwen-vae-tiny.safetensors"), str(work / "st_native.st")),
        "untiled": decode_graph(ours("qwen-vae-tiny.safetensors"), str(work / "untiled.st"), size=64),
        "tiled": decode_graph(ours("qwen-vae-tiny.safetensors"), str(work / "tiled.st"), "VAEDecodeTiled", size=64,
                              tile_size=256, overlap=64, temporal_size=64, temporal_overlap=8),
    }
    for q in ("F16", "BF16", "Q8_0"):
        cases[f"{q}_ours"] = decode_graph(ours(f"qwen-vae-tiny-{q}.gguf"), str(work / f"{q}_ours.st"))
        cases[f"{q}_native"] = decode_graph(native(f"qwen-vae-tiny-{q}-twin.safetensors"), str(work / f"{q}_native.st"))
    cases["guard_recovers"] = sample_graph("qwen-overflows-fp16.gguf", str(work / "guard_recovers.st"), "float16")
    cases["unguarded_fp16"] = sample_graph("qwen-overflows-fp16.gguf", str(work / "unguarded_fp16.st"), "float16",
                                           guard=False)
    names = list(cases)
    prompts = list(cases.values())
    prompts.append(sample_graph("qwen-nan-weight.gguf", str(work / "never.st")))
    wrong = decode_graph(ours("qwen-vae-tiny.safetensors"), str(work / "never.st"), "QwenImageGGUFVAEDecode",
                         model=["zimg", 0])
    wrong["zimg"] = {"class_type": "QwenImageGGUFUnetLoader", "inputs": {"unet_name": "z-image-tiny.gguf"}}
    prompts.append(wrong)
    damaged = ["qwen-vae-no-head.safetensors", "qwen-vae-missing.gguf", "qwen-vae-misshaped.safetensors"]
    prompts += [decode_graph(ours(name), str(work / "never.st")) for name in damaged]
    prompts.append(decode_graph(ours("flux-decoder-only.safetensors"), str(work / "never.st"), "VAEDecode") | {
        "pixels": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["pixels", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "TestSaveLatent", "inputs": {"samples": ["enc", 0], "path": str(work / "never.st")}}})
    results = run_prompts(work, models, prompts)
    out = {}
    for name, result in zip(names, results):
        assert result["success"], f"{name}: {result['error'] and result['error'].get('exception_message')}"
        data = load_file(str(work / f"{name}.st"))
        out[name] = data.get("images", data.get("samples"))
    out["nan_weight"], out["wrong_vae"] = results[len(names)], results[len(names) + 1]
    out["damaged"] = dict(zip(damaged, results[len(names) + 2:]))
    out["decoder_only_encode"] = results[-1]
    return out


def close(a, b, tol=1e-5):
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("case", ["st", "F16", "BF16", "Q8_0"])
def test_decode_matches_comfyui_vae_loader(runs, case):
    assert torch.isfinite(runs[f"{case}_ours"]).all()
    assert close(runs[f"{case}_ours"], runs[f"{case}_native"]), case


def test_tiled_and_untiled_agree(runs):
    assert runs["tiled"].shape == runs["untiled"].shape
    assert (runs["tiled"] - runs["untiled"]).abs().mean().item() < 0.02


def test_auto_tiling_and_fp32_redecode(models, tmp_path):
    r = run_script(tmp_path, models, REPO / "tests" / "comfy_scripts" / "vae_guard.py", package=PACKAGE_NAME,
                   vae=str(models / "vae" / "qwen-vae-tiny.safetensors"))
    assert r["auto_tiled_logged"] and r["tiled_vs_untiled"] < 0.02, r
    assert not r["plain_fp16_finite"], "the poisoned VAE should overflow in fp16"
    # (The guarded VAE's weights went through fp16 once, so they match the fp32 reference to fp16 precision.)
    assert r["guarded_fp16_finite"] and r["fp32_redo_logged"] and r["guarded_vs_fp32"] < 1e-2, r
    assert r["broken_error"] and "broken.safetensors" in r["broken_error"] and "even in fp32" in r["broken_error"], r


def test_guard_recovers_from_fp16_overflow(runs):
    assert torch.isfinite(runs["guard_recovers"]).all()
    assert not torch.isfinite(runs["unguarded_fp16"]).all(), "without the guard the fp16 model should fail"


def test_guard_stops_with_a_clear_error_on_a_corrupt_weight(runs):
    r = runs["nan_weight"]
    assert not r["success"]
    message = r["error"]["exception_message"]
    for fragment in ("qwen-nan-weight.gguf", "step 1 of 3", "sigma", "fp32", "transformer_blocks.1.attn.to_k.weight",
                     "download it again"):
        assert fragment in message, message


def test_damaged_vaes_are_refused_with_what_is_wrong(runs):
    expected = {"qwen-vae-no-head.safetensors": ["missing decoder.head.2.weight"],
                "qwen-vae-missing.gguf": [f"missing {DROPPED}"],
                "qwen-vae-misshaped.safetensors": [SHORTENED, "expected"]}
    for name, fragments in expected.items():
        r = runs["damaged"][name]
        assert not r["success"] and r["error"]["exception_type"].endswith("GGUFError"), r
        message = r["error"]["exception_message"]
        assert name in message and all(f in message for f in fragments), message


def test_decoder_only_vae_decodes_and_refuses_to_encode(runs):
    r = runs["decoder_only_encode"]
    assert not r["success"]
    message = r["error"]["exception_message"]
    assert "flux-decoder-only.safetensors" in message and "only the decoder" in message, message


def test_vae_of_another_family_is_refused(runs):
    message = runs["wrong_vae"]["error"]["exception_message"]
    assert "Qwen-Image VAE" in message and "Z-Image" in message and "Flux VAE" in message
