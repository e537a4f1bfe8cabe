"""Our converter's files through city96's ComfyUI-GGUF, the loader most Qwen-Image GGUF users run.

Its code is not on PyPI: the test runs where it is at hand (``CITY96_GGUF_PATH``, a ComfyUI-GGUF
checkout, or ComfyUI-GGUF among the custom nodes of the ComfyUI under test) and skips elsewhere. A
tiny Qwen-Image converted at each level (and a tiny Edit-2511 and Z-Image) samples in real ComfyUI through
city96's UnetLoaderGGUF as its dequantized twin does in ComfyUI's own model, and as through ours.
(ComfyUI's model detection, which city96's loader calls, assumes the full-size widths: the test node
running it gives the detection the tiny model's sizes, as the reference loader does.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader, quants
from safetensors.torch import load_file, save_file

from comfy_env import comfyui_path, requires_comfyui, run_prompts
from comfy_graphs import assert_close, gguf_loader, native_loader, sampling_graph, short_error
from tiny_models import QWEN_IMAGE, Z_IMAGE, qwen_image_shapes, random_weights, z_image_shapes
from loaders.convert.checkpoint import open_checkpoint
from loaders.convert.to_gguf import convert
from loaders.models.diffusion import open_diffusion_model

# Every block family: K-quants of each width, the 32-element types, IQ4, and 16-bit.
QWEN_LEVELS = ("Q4_K_M", "Q5_K_S", "Q3_K_M", "Q2_K", "Q6_K", "Q8_0", "Q4_0", "Q5_1", "IQ4_XS", "IQ4_NL", "BF16")


def city96_path() -> Path | None:
    for candidate in (os.environ.get("CITY96_GGUF_PATH"), comfyui_path() / "custom_nodes" / "ComfyUI-GGUF"):
        if candidate and (Path(candidate) / "loader.py").is_file() and (Path(candidate) / "nodes.py").is_file():
            return Path(candidate)
    return None


pytestmark = [requires_comfyui, pytest.mark.skipif(
    city96_path() is None, reason="city96's ComfyUI-GGUF is not at hand (set CITY96_GGUF_PATH to a checkout of "
                                  "github.com/city96/ComfyUI-GGUF to run this)")]


def twin(gguf: Path, out: Path) -> None:
    """The GGUF's values as the gguf package decodes them, in a safetensors file (float32)."""
    values = {}
    for t in GGUFReader(str(gguf)).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        values[t.name] = torch.from_numpy(quants.dequantize(t.data, T(t.tensor_type)).reshape(shape).astype(np.float32))
    save_file(values, str(out))


def city96_loader(models: Path, name: str) -> dict:
    config = open_diffusion_model(str(models / "diffusion_models" / name)).unet_config
    return {"class_type": "TestCity96UnetLoader", "inputs": {"unet_name": name, "config_json": json.dumps(config)}}


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dm = root / "diffusion_models"
    dm.mkdir(parents=True)
    sources = tmp_path_factory.mktemp("sources")
    qwen = {k: torch.from_numpy(v).bfloat16() for k, v in random_weights(qwen_image_shapes(**QWEN_IMAGE), 0).items()}
    save_file(qwen, str(sources / "qwen.safetensors"))
    save_file({**qwen, "__index_timestep_zero__": torch.empty(0)}, str(sources / "edit.safetensors"))
    save_file({k: torch.from_numpy(v).bfloat16() for k, v in random_weights(z_image_shapes(**Z_IMAGE), 1).items()},
              str(sources / "z.safetensors"))
    files = {f"qwen-{level}": ("qwen.safetensors", level, "qwen_image") for level in QWEN_LEVELS}
    # Edit-2511 samples with a reference image: its marker must reach ComfyUI's detection.
    files["edit-Q4_K_M"] = ("edit.safetensors", "Q4_K_M", "qwen_image")
    files["z-Q4_K_M"] = ("z.safetensors", "Q4_K_M", "z_image")
    work = tmp_path_factory.mktemp("comfy")
    prompts, names = [], []
    for name, (source, level, family) in files.items():
        convert(open_checkpoint(sources / source), dm / f"{name}.gguf", level)
        twin(dm / f"{name}.gguf", dm / f"{name}-twin.safetensors")
        for loader, graph in (("city96", city96_loader(root, f"{name}.gguf")), ("ours", gguf_loader(f"{name}.gguf")),
                              ("twin", native_loader(root, f"{name}.gguf", f"{name}-twin.safetensors", family))):
            prompts.append(sampling_graph(graph, str(work / f"{name}-{loader}.safetensors"), 256,
                                          reference=8 if name.startswith("edit") else 0))
            names.append(f"{name}-{loader}")
    results = run_prompts(work, root, prompts, other_nodes={"ComfyUI-GGUF": city96_path()})
    for name, result in zip(names, results):
        assert result["success"], f"{name}: {short_error(result['error'])}"
    return {name: load_file(str(work / f"{name}.safetensors"))["samples"] for name in names}


@pytest.mark.parametrize("name", [f"qwen-{level}" for level in QWEN_LEVELS] + ["edit-Q4_K_M", "z-Q4_K_M"])
def test_city96_samples_our_file_as_its_dequantized_twin(latents, name):
    assert_close(latents[f"{name}-city96"], latents[f"{name}-twin"])
    assert_close(latents[f"{name}-ours"], latents[f"{name}-twin"])
