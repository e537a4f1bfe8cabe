"""The save node in real ComfyUI: a MODEL with a LoRA saved as GGUF holds the merged weights (the
same from our MODEL and from ComfyUI's native one of the same weights), and the saved file samples
as its dequantized twin does in ComfyUI's own model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader, quants
from safetensors.torch import load_file, save_file

from comfy_env import PACKAGE_NAME, REPO, requires_comfyui, run_prompts, run_script
from llama_cpp_ref import expected
from comfy_graphs import assert_close, gguf_loader, native_loader, sampling_graph, short_error
from tiny_models import (LORA_TARGETS, QWEN_IMAGE, Z_IMAGE, qwen_image_recipe, qwen_image_shapes, random_weights,
                         write_lora, write_model, z_image_shapes)
from loaders.convert.recipes import uniform_recipe
from loaders.gguf.writer import encode

pytestmark = requires_comfyui


def save(model: list, name: str, overwrite: bool = False) -> dict:
    return {"class_type": "QwenImageGGUFSave", "inputs": {"model": model, "type": "Q8_0", "filename": name,
                                                          "overwrite": overwrite}}


def with_lora(loader: dict, node: str) -> dict:
    return {f"{node}_loader": loader,
            node: {"class_type": "LoraLoaderModelOnly", "inputs": {"model": [f"{node}_loader", 0],
                                                                 "lora_name": "tiny-lora.safetensors",
                                                                 "strength_model": 1.0}}}


def read(path) -> dict[str, np.ndarray]:
    """Each tensor of a GGUF decoded by the gguf package, in torch order."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = quants.dequantize(t.data, T(t.tensor_type)).reshape(shape).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "diffusion_models").mkdir()
    (root / "loras").mkdir()
    weights = random_weights(qwen_image_shapes(**QWEN_IMAGE), seed=0)
    write_model(root / "diffusion_models" / "qwen-tiny-Q4_K_M.gguf", weights, qwen_image_recipe(),
                twin=str(root / "diffusion_models" / "qwen-tiny.safetensors"))
    write_lora(root / "loras" / "tiny-lora.safetensors", weights)
    write_model(root / "diffusion_models" / "z-image-tiny-Q4_K.gguf", random_weights(z_image_shapes(**Z_IMAGE), 1),
                uniform_recipe(T.Q4_K), arch="lumina2", twin=str(root / "diffusion_models" / "z-image-tiny.safetensors"))
    native = native_loader(root, "qwen-tiny-Q4_K_M.gguf", "qwen-tiny.safetensors", "qwen_image")
    fp8 = native_loader(root, "qwen-tiny-Q4_K_M.gguf", "qwen-tiny.safetensors", "qwen_image", "fp8_e4m3fn")
    prompts = [
        {**with_lora(gguf_loader("qwen-tiny-Q4_K_M.gguf"), "lora"), "save": save(["lora", 0], "ours-lora")},
        {**with_lora(native, "lora"), "save": save(["lora", 0], "native-lora")},
        {"loader": gguf_loader("qwen-tiny-Q4_K_M.gguf"), "save": save(["loader", 0], "ours-plain")},
        # Another model under a name already saved (a graph of its own: an unchanged one is ComfyUI's cache).
        {**with_lora(gguf_loader("qwen-tiny-Q4_K_M.gguf"), "lora"), "save": save(["lora", 0], "ours-plain")},
        {"loader": gguf_loader("z-image-tiny-Q4_K.gguf"), "save": save(["loader", 0], "z-image")},
        # Sampling loads the LoRA model fully: ComfyUI merges the LoRA into the weights its clones share.
        {**sampling_graph(gguf_loader("qwen-tiny-Q4_K_M.gguf"), str(tmp_path_factory.mktemp("s") / "l.safetensors"),
                          256, lora="tiny-lora.safetensors")},
        {"loader": gguf_loader("qwen-tiny-Q4_K_M.gguf"), "save": save(["loader", 0], "after-sampling-plain")},
        {**with_lora(gguf_loader("qwen-tiny-Q4_K_M.gguf"), "lora"), "save": save(["lora", 0], "after-sampling-lora")},
        # ComfyUI's own loader storing the weights in fp8 (UNETLoader's weight_dtype fp8_e4m3fn).
        {"loader": fp8, "save": save(["loader", 0], "native-fp8")},
        {**with_lora(fp8, "lora"), "save": save(["lora", 0], "native-fp8-lora")},
    ]
    work = tmp_path_factory.mktemp("comfy")
    results = run_prompts(work, root, prompts)
    for result in results[:3] + results[4:]:
        assert result["success"], short_error(result["error"])
    dm = root / "diffusion_models"
    names = ("ours-lora", "native-lora", "ours-plain", "z-image", "after-sampling-plain", "after-sampling-lora",
             "native-fp8", "native-fp8-lora")
    files = {name: read(dm / f"{name}-Q8_0.gguf") for name in names}
    types = {name: {t.name: T(t.tensor_type) for t in GGUFReader(str(dm / f"{name}-Q8_0.gguf")).tensors} for name in names}
    # The saved file through our loader against its dequantized twin in ComfyUI's own model.
    save_file({k: torch.from_numpy(v) for k, v in files["ours-lora"].items()}, str(dm / "ours-lora-twin.safetensors"))
    sampled = run_prompts(work, root, [
        sampling_graph(gguf_loader("ours-lora-Q8_0.gguf"), str(work / "ours.safetensors"), 256),
        sampling_graph(native_loader(root, "ours-lora-Q8_0.gguf", "ours-lora-twin.safetensors", "qwen_image"),
                       str(work / "twin.safetensors"), 256)])
    for result in sampled:
        assert result["success"], short_error(result["error"])
    latents = {name: load_file(str(work / f"{name}.safetensors"))["samples"] for name in ("ours", "twin")}
    return {"twin": load_file(str(dm / "qwen-tiny.safetensors")), "z_twin": load_file(str(dm / "z-image-tiny.safetensors")),
            "arch": GGUFReader(str(dm / "z-image-Q8_0.gguf")).fields["general.architecture"], "types": types, "files": files, "again": results[3], "latents": latents,
            "lora": load_file(str(root / "loras" / "tiny-lora.safetensors"))}


def test_a_lora_is_merged_into_the_saved_weights(saved):
    files, lora = saved["files"], saved["lora"]
    for target in LORA_TARGETS:
        key = target + ".weight"
        up, down = lora[f"diffusion_model.{target}.lora_up.weight"], lora[f"diffusion_model.{target}.lora_down.weight"]
        alpha = float(lora[f"diffusion_model.{target}.alpha"])
        # The weight the model holds (the file's Q4_K_M values), plus the LoRA's product by its definition.
        merged = saved["twin"][key].numpy() + (alpha / up.shape[1]) * (up @ down).numpy()
        want = quants.dequantize(encode(merged, T.Q8_0), T.Q8_0).reshape(merged.shape)
        step = np.abs(merged).max() / 127  # one Q8_0 step of the largest block: rounding may flip there
        assert np.abs(files["ours-lora"][key] - want).max() <= step, key
        assert np.abs(files["ours-lora"][key] - files["ours-plain"][key]).max() > 10 * step, f"{key}: no LoRA in it"
    untouched = "transformer_blocks.2.attn.to_k.weight"
    np.testing.assert_array_equal(files["ours-lora"][untouched], files["ours-plain"][untouched])


def test_our_model_and_comfyuis_native_model_save_the_same_file(saved):
    ours, native = saved["files"]["ours-lora"], saved["files"]["native-lora"]
    assert set(ours) == set(native)
    for key in ours:
        step = max(np.abs(ours[key]).max(), 1e-8) / 127
        assert np.abs(ours[key] - native[key]).max() <= step, key


def test_the_saved_file_samples_as_its_dequantized_twin(saved):
    assert_close(saved["latents"]["ours"], saved["latents"]["twin"])


def test_an_existing_file_is_not_overwritten(saved):
    again = saved["again"]
    assert not again["success"]
    assert "ours-plain-Q8_0.gguf: already exists" in again["error"]["exception_message"]


@pytest.mark.parametrize("model", ["qwen", "z-image"])
def test_weights_without_patches_are_saved_as_the_model_holds_them(saved, model):
    # Our Q4_K bytes dequantized exactly, then encoded: the same as encoding the twin's values.
    twin, name = (saved["twin"], "ours-plain") if model == "qwen" else (saved["z_twin"], "z-image")
    file, types = saved["files"][name], saved["types"][name]
    assert set(file) == set(twin)
    for key, value in twin.items():
        np.testing.assert_array_equal(file[key], expected(value.float(), types[key]), err_msg=key)
    assert types["txt_in.weight" if model == "qwen" else "x_embedder.weight"] in (T.F16, T.BF16)
    if model == "z-image":
        assert bytes(saved["arch"].parts[-1]).decode() == "lumina2"


def test_a_model_comfyui_has_patched_is_saved_unpatched_and_merged_once(saved):
    files = saved["files"]
    for key in files["ours-plain"]:
        np.testing.assert_array_equal(files["after-sampling-plain"][key], files["ours-plain"][key], err_msg=key)
        np.testing.assert_array_equal(files["after-sampling-lora"][key], files["ours-lora"][key], err_msg=key)


def test_comfyuis_fp8_model_is_saved_as_it_holds_its_weights(saved):
    twin, files, types, lora = saved["twin"], saved["files"], saved["types"]["native-fp8"], saved["lora"]
    assert set(files["native-fp8"]) == set(twin)
    for key, value in twin.items():
        held = value.to(torch.float8_e4m3fn).float()
        want, unrounded = expected(held, types[key]), expected(value.float(), types[key])
        got = files["native-fp8"][key]
        if value.dim() == 2:  # every Linear weight: ComfyUI holds it in fp8
            assert not np.array_equal(want, unrounded), key
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:  # held in fp8 or in the compute dtype, as ComfyUI's ops create them
            assert np.array_equal(got, want) or np.array_equal(got, unrounded), key
    for target in LORA_TARGETS:
        key = target + ".weight"
        up, down = lora[f"diffusion_model.{target}.lora_up.weight"], lora[f"diffusion_model.{target}.lora_down.weight"]
        alpha = float(lora[f"diffusion_model.{target}.alpha"])
        merged = twin[key].to(torch.float8_e4m3fn).float().numpy() + (alpha / up.shape[1]) * (up @ down).numpy()
        want = quants.dequantize(encode(merged, T.Q8_0), T.Q8_0).reshape(merged.shape)
        step = np.abs(merged).max() / 127
        assert np.abs(files["native-fp8-lora"][key] - want).max() <= step, key


def test_the_saver_writes_to_diffusion_models_not_comfyuis_legacy_unet_folder(tmp_path):
    # ComfyUI lists models/unet first by default; a folder a user put first is theirs to keep.
    r = run_script(tmp_path, tmp_path / "models", REPO / "tests" / "comfy_scripts" / "save_folder.py",
                   package=PACKAGE_NAME)
    assert r["default"] == r["modern"] and r["user"] == "/data/my-models"
