"""The tiny models the integration tests load through ComfyUI, written once per test module: random
weights under the real architectures' names, as GGUF files and as safetensors twins that ComfyUI
loads natively."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy

from comfy_env import REPO, comfyui_path, run_script
from loaders.convert.recipes import uniform_recipe
from loaders.gguf.writer import write_gguf
from tiny_models import (QWEN_IMAGE, Z_IMAGE, qwen_image_recipe, qwen_image_shapes, random_weights, write_lora,
                         write_model, z_image_shapes)
from tiny_text_encoders import QWEN3, QWEN25VL, VISION, write_llm, write_mmproj


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Diffusion models (Qwen-Image, Edit-2511 with its marker, Z-Image; as our converter and as
    stable-diffusion.cpp write them) with their safetensors twins, a LoRA, a "Fun" ControlNet, a VAE,
    broken files, and a text encoder given to the wrong loader."""
    root = tmp_path_factory.mktemp("models")
    dm = root / "diffusion_models"
    (root / "loras").mkdir(parents=True)
    dm.mkdir()
    qwen = random_weights(qwen_image_shapes(**QWEN_IMAGE), seed=0)
    write_model(dm / "qwen-tiny-Q4_K_M.gguf", qwen, qwen_image_recipe(), twin=str(dm / "qwen-tiny.safetensors"))
    write_model(dm / "qwen-tiny-sdcpp.gguf", qwen, qwen_image_recipe(), arch=None, prefix="model.diffusion_model.")
    marker = {"__index_timestep_zero__": np.zeros(0, dtype=np.float32)}
    write_model(dm / "qwen-edit-2511-tiny.gguf", qwen, qwen_image_recipe(T.Q8_0), extra_tensors=marker,
                twin=str(dm / "qwen-edit-2511-tiny.safetensors"))
    zimg = random_weights(z_image_shapes(**Z_IMAGE), seed=1)
    chosen = write_model(dm / "z-image-tiny-Q4_K.gguf", zimg, uniform_recipe(T.Q4_K), arch="lumina2",
                         twin=str(dm / "z-image-tiny.safetensors"))
    # As stable-diffusion.cpp writes Z-Image (leejet's files): sd.cpp names, no architecture, and ggml's
    # writer dropping the pad tokens' leading 1 ([1, d] stored as [d]); the same types as the file above.
    squeezed = {k: v.reshape(-1) if k.endswith("pad_token") else v for k, v in zimg.items()}
    write_model(dm / "z-image-tiny-sdcpp.gguf", squeezed, lambda name, shape: chosen[name], arch=None,
                prefix="model.diffusion_model.")
    write_lora(root / "loras" / "tiny-lora.safetensors", qwen)
    scripts = REPO / "tests" / "comfy_scripts"
    for folder in ("controlnet", "vae"):
        (root / folder).mkdir()
    run_script(tmp_path_factory.mktemp("mk_cn"), root, scripts / "make_fun_controlnet.py", seed=3,
               heads=QWEN_IMAGE["heads"], head_dim=QWEN_IMAGE["head_dim"],
               out=str(root / "controlnet" / "tiny-fun-controlnet.safetensors"))
    run_script(tmp_path_factory.mktemp("mk_vae"), root, scripts / "make_wan_vae.py", dim=16, seed=0,
               out=str(root / "vae" / "qwen-vae-tiny.safetensors"))
    # Broken files that used to load: a weight removed, a weight one row short.
    write_model(dm / "qwen-missing.gguf", {k: v for k, v in qwen.items() if k != "transformer_blocks.1.attn.to_k.weight"},
                qwen_image_recipe(T.Q8_0))
    write_model(dm / "qwen-short.gguf", {**qwen, "transformer_blocks.2.img_mlp.net.0.proj.weight":
                                         qwen["transformer_blocks.2.img_mlp.net.0.proj.weight"][:-1]},
                qwen_image_recipe(T.Q8_0))
    write_gguf(dm / "Qwen2.5-VL-tiny-Q4_K_M.gguf", {"token_embd.weight": np.zeros((8, 256), np.float32),
                                                     "blk.0.attn_q.weight": np.zeros((256, 256), np.float32)},
               uniform_recipe(T.Q4_K), arch="qwen2vl")
    return root


@pytest.fixture(scope="module")
def te_models(tmp_path_factory):
    """Text encoders with their safetensors twins: Qwen2.5-VL with its mmproj, with its own output head
    and without a tokenizer, and Qwen3 (Z-Image's)."""
    root = tmp_path_factory.mktemp("te_models")
    te = root / "text_encoders"
    te.mkdir()
    tokenizer = comfyui_path() / "comfy" / "text_encoders" / "qwen25_tokenizer"
    write_llm(te / "Qwen2.5-VL-tiny-Q4_K_M.gguf", "qwen2vl", QWEN25VL, tokenizer, te / "llm.st")
    write_mmproj(te / "mmproj-F16.gguf", VISION, QWEN25VL["hidden"], te / "vision.st")
    twin = {**load_numpy(str(te / "llm.st")), **load_numpy(str(te / "vision.st"))}
    save_numpy(twin, str(te / "qwen25vl-tiny.safetensors"))
    write_llm(te / "Qwen2.5-VL-tiny-notok.gguf", "qwen2", QWEN25VL, None, None)
    write_llm(te / "Qwen3-tiny-Q4_K_M.gguf", "qwen3", QWEN3, tokenizer, te / "qwen3-tiny.safetensors")
    write_llm(te / "Qwen2.5-VL-tiny-head.gguf", "qwen2vl", QWEN25VL, tokenizer, te / "qwen25vl-head.safetensors",
              head=True)
    for name in ("llm.st", "vision.st"):
        (te / name).unlink()
    return root
