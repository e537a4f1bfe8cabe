"""The diffusion-model loader in real ComfyUI: sampling matches ComfyUI's own model on the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from comfy_env import requires_comfyui, run_prompts
from comfy_graphs import assert_close, gguf_loader, native_loader, sampling_graph, short_error

pytestmark = requires_comfyui

CACHE = {"reuse_threshold": 3.0, "start_percent": 0.0, "end_percent": 1.0, "verbose": True}
CORE_NODE_CASES = {
    "plain_8": (),
    "easycache": (("EasyCache", CACHE),),
    "lazycache": (("LazyCache", CACHE),),
    "cfgnorm": (("CFGNorm", {"strength": 0.5, "pre_cfg": False}),),
    "compiled": (("TorchCompileModel", {"backend": "inductor"}),),
    # Qwen-Image-2512's "Fun" ControlNet: it runs blocks of its own on the base model's own layers.
    "controlnet": (),
}


@pytest.fixture(scope="module")
def latents(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("comfy")
    cases = {
        "qwen": (gguf_loader("qwen-tiny-Q4_K_M.gguf"), 256, None),
        "qwen_native": (native_loader(models, "qwen-tiny-Q4_K_M.gguf", "qwen-tiny.safetensors", "qwen_image"), 256, None),
        "qwen_lora": (gguf_loader("qwen-tiny-Q4_K_M.gguf"), 256, "tiny-lora.safetensors"),
        "qwen_lora_native": (native_loader(models, "qwen-tiny-Q4_K_M.gguf", "qwen-tiny.safetensors", "qwen_image"),
                             256, "tiny-lora.safetensors"),
        "qwen_sdcpp": (gguf_loader("qwen-tiny-sdcpp.gguf"), 256, None),
        "qwen_cached": (gguf_loader("qwen-tiny-Q4_K_M.gguf", "cached"), 256, None),
        "qwen_cached_lora": (gguf_loader("qwen-tiny-Q4_K_M.gguf", "cached"), 256, "tiny-lora.safetensors"),
        "qwen_fp8": (gguf_loader("qwen-tiny-Q4_K_M.gguf", "fp8 compute"), 256, None),
        "qwen_fp8_stream": (gguf_loader("qwen-tiny-Q4_K_M.gguf", "fp8 on the fly"), 256, None),
        "edit": (gguf_loader("qwen-edit-2511-tiny.gguf"), 256, None),
        "edit_native": (native_loader(models, "qwen-edit-2511-tiny.gguf", "qwen-edit-2511-tiny.safetensors",
                                      "qwen_image"), 256, None),
        "zimage": (gguf_loader("z-image-tiny-Q4_K.gguf"), 256, None),
        "zimage_native": (native_loader(models, "z-image-tiny-Q4_K.gguf", "z-image-tiny.safetensors", "z_image"),
                          256, None),
        "zimage_sdcpp": (gguf_loader("z-image-tiny-sdcpp.gguf"), 256, None),
    }
    # The edit cases carry a reference latent, so the reference method (Edit-2511's marker) counts.
    prompts = [sampling_graph(loader, str(work / f"{name}.safetensors"), width, lora,
                              reference=8 if name.startswith("edit") else 0)
               for name, (loader, width, lora) in cases.items()]
    # ComfyUI's own model-patching nodes on our MODEL and on its native one, over more steps so that
    # the step caches have steps to skip (a threshold that lets them).
    native = native_loader(models, "qwen-tiny-Q4_K_M.gguf", "qwen-tiny.safetensors", "qwen_image")
    for node, patches in CORE_NODE_CASES.items():
        control = "tiny-fun-controlnet.safetensors" if node == "controlnet" else None
        # TorchCompileModel: ours compiled against ours eager (compiling ComfyUI's own model as well
        # would double the longest compile of the suite and test nothing of ours).
        variants = ((node, gguf_loader("qwen-tiny-Q4_K_M.gguf")),) + (() if node == "compiled" else
                                                                     ((node + "_native", native),))
        for name, loader in variants:
            cases[name] = None
            prompts.append(sampling_graph(loader, str(work / f"{name}.safetensors"), 256, patches=patches, steps=8,
                                          control=control))
    prompts.append({"loader": gguf_loader("Qwen2.5-VL-tiny-Q4_K_M.gguf"),
                     "shift": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["loader", 0], "shift": 3.1}},
                     "save": {"class_type": "TestSaveLatent", "inputs": {
                         "samples": ["latent", 0], "path": str(work / "never.safetensors")}},
                     "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                     "sampler": {"class_type": "KSampler", "inputs": {
                         "model": ["shift", 0], "seed": 7, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                         "scheduler": "simple", "positive": ["pos", 0], "negative": ["pos", 0],
                         "latent_image": ["latent", 0], "denoise": 1.0}},
                     "pos": {"class_type": "TestConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 256}}})
    prompts[-1]["save"]["inputs"]["samples"] = ["sampler", 0]
    # Text features of another width (another encoder's) than the model takes.
    narrow = sampling_graph(gguf_loader("qwen-tiny-Q4_K_M.gguf"), str(work / "never_narrow.safetensors"), 128)
    prompts.append(narrow)
    results = run_prompts(work, models, prompts)
    out = {}
    for name, result in zip(cases, results):
        assert result["success"], f"{name}: {short_error(result['error'])}"
        out[name] = load_file(str(work / f"{name}.safetensors"))["samples"]
    out["wrong_kind"], out["narrow_text"] = results[-2:]
    return out


def test_gguf_sampling_matches_native(latents):
    assert_close(latents["qwen"], latents["qwen_native"])


def test_cached_mode_matches_native(latents):
    assert_close(latents["qwen_cached"], latents["qwen_native"])
    assert_close(latents["qwen_cached_lora"], latents["qwen_lora_native"])


def test_fp8_modes_without_fp8_tensor_cores_run_on_the_fly(latents):
    # No fp8 matmul on the CPU: the loader says so in the log and keeps the GGUF weights.
    if torch.cuda.is_available():
        pytest.skip("on a GPU, test_gpu checks the fp8 modes themselves")
    assert_close(latents["qwen_fp8"], latents["qwen_native"])
    assert torch.equal(latents["qwen_fp8_stream"], latents["qwen"])


def test_lora_matches_native_lora(latents):
    assert_close(latents["qwen_lora"], latents["qwen_lora_native"])
    assert (latents["qwen_lora"] - latents["qwen"]).abs().max() > 1e-2, "the LoRA changed nothing"


def test_sdcpp_naming_matches(latents):
    assert_close(latents["qwen_sdcpp"], latents["qwen_native"])


def test_edit_2511_matches_native(latents):
    assert_close(latents["edit"], latents["edit_native"])


def test_z_image_matches_native(latents):
    assert_close(latents["zimage"], latents["zimage_native"])


def test_z_image_as_stable_diffusion_cpp_writes_it_matches_native(latents):
    assert_close(latents["zimage_sdcpp"], latents["zimage_native"])


@pytest.mark.parametrize("node", [n for n in CORE_NODE_CASES if n not in ("plain_8", "compiled")])
def test_core_model_patch_nodes_match_native(latents, node):
    assert_close(latents[node], latents[node + "_native"])
    # The node did something (a cache that never reuses a step would pass the line above alone).
    assert (latents[node] - latents["plain_8"]).abs().max() > 1e-3, f"{node} changed nothing"


def test_torch_compile_model_node_matches(latents):
    # Compiled (inductor) and eager runs of our model agree.
    assert_close(latents["compiled"], latents["plain_8"])


def test_wrong_kind_file_gets_clear_error(latents):
    result = latents["wrong_kind"]
    assert not result["success"]
    message = result["error"]["exception_message"]
    assert "Qwen2.5-VL-tiny-Q4_K_M.gguf" in message and "language model" in message and "CLIP-VL" in message


def test_text_features_of_another_width_get_clear_error(latents):
    result = latents["narrow_text"]
    assert not result["success"]
    message = result["error"]["exception_message"]
    assert message.startswith("qwen-tiny-Q4_K_M.gguf: the prompt's conditioning is 128 wide"), message
    assert "takes 256-wide text features" in message and "Qwen2.5-VL-7B" in message


def test_model_management_lifecycle(models, tmp_path):
    from comfy_env import PACKAGE_NAME, REPO, run_script
    r = run_script(tmp_path, models, REPO / "tests" / "comfy_scripts" / "model_lifecycle.py",
                   package=PACKAGE_NAME, gguf="qwen-tiny-Q4_K_M.gguf", twin="qwen-tiny.safetensors",
                   lora="tiny-lora.safetensors")
    tol = 1e-4
    assert r["base"] < tol and r["clone"] < tol and r["after_unpatch"] < tol, r
    assert r["lora_effect"] > 1e-2, r
    assert r["lora_full"] < tol and r["lora_partial"] < tol and r["lora_partial_again"] < tol, r
    # The per-layer LoRA runs from its cached low-rank form, never ComfyUI's from-scratch patch math...
    assert r["lora_partial_full_patch_calls"] == 0, r
    # ... which still serves the patch kinds that have no low-rank form.
    assert r["diff_patch_effect"] > 1e-2 and r["diff_patch_partial"] < tol, r
    assert r["diff_patch_full_patch_calls"] > 0, r
    assert r["factors_while_loaded"] > 0 and r["factors_after_detach"] == 0, r
    assert r["bad_lora_partial"] < tol, r
    # Merged once at load for the patched layers only; back to quantized after unpatching; the per-layer
    # (partial) path keeps everything quantized.
    assert 0 < r["quantized_params_lora_merged"] < r["quantized_params"], r
    assert r["quantized_params_after_unpatch"] == r["quantized_params"] == r["quantized_params_partial"], r
    # ComfyUI's memory accounting sees the quantized bytes, not a dequantized size.
    # (The model also holds a few small buffers of its own that are not in the file.)
    assert r["file_tensor_bytes"] <= r["model_size"] < 1.01 * r["file_tensor_bytes"], r
    assert r["model_size"] < r["native_size"] / 3, r
    # A mode the loader does not know (an API prompt can send one) is refused, naming the file.
    assert r["bad_mode_error"].startswith("GGUFError") and "qwen-tiny-Q4_K_M.gguf" in r["bad_mode_error"], r
    assert "'fastest'" in r["bad_mode_error"] and "on the fly" in r["bad_mode_error"], r
    # Cached mode with room for everything (the CPU's RAM here): no conversion at load; each layer
    # holds a dequantized copy from its first run on, the bytes stay what ComfyUI accounts and pages.
    assert r["cached_copies_before"] == 0 and r["cached_copies"] == r["cached_quantized_params"] > 0, r
    assert r["cached"] < tol and r["cached_again"] < tol, r
    assert r["cached_bias_patch_effect"] > 1e-2 and r["cached_bias_patch"] < tol and r["cached_after_bias_patch"] < tol, r
    assert r["cached_model_size"] == r["model_size"], r
    assert r["cached_copies_after_free"] == 0 == r["cached_copies_after_detach"], r
    n = r["cached_copies"]
    assert len(r["copies_freed_said"]) == 2, r["copies_freed_said"]
    freed_for_memory, freed_at_unload = r["copies_freed_said"]
    assert f"converted copies of {n} layers" in freed_for_memory and "asked the model for memory" in freed_for_memory
    assert f"converted copies of {n} layers" in freed_at_unload and "unloaded the model" in freed_at_unload


def test_changed_comfyui_internals_take_their_fallbacks_with_one_line_each(models, tmp_path):
    from comfy_env import PACKAGE_NAME, REPO, run_script
    r = run_script(tmp_path, models, REPO / "tests" / "comfy_scripts" / "compat_fallbacks.py",
                   package=PACKAGE_NAME, gguf="qwen-tiny-Q4_K_M.gguf", twin="qwen-tiny.safetensors",
                   lora="tiny-lora.safetensors")
    assert r["features"] == {"dynamic_marks": False, "low_rank_lora": False, "fp32_redo": False,
                             "cast": "_CastBytes"}, r
    assert r["restored"] == {"dynamic_marks": True, "low_rank_lora": True, "fp32_redo": True}, r
    assert len(r["lines"]) == 4 and all("ComfyUI" in line for line in r["lines"]), r
    # The LoRA on the quantized layers through ComfyUI's own patch function (its full-size math, run
    # otherwise only for the model's float layers), the bytes through cast_bias_weight: the same result.
    assert r["full_lora_math_calls"][1] > r["full_lora_math_calls"][0], r
    assert r["fallback_vs_present"] < 1e-5, r


def test_gguf_linear_compiles_without_graph_breaks(models, tmp_path):
    from comfy_env import PACKAGE_NAME, REPO, run_script
    r = run_script(tmp_path, models, REPO / "tests" / "comfy_scripts" / "compile_check.py",
                   package=PACKAGE_NAME, gguf="qwen-tiny-Q4_K_M.gguf", backend="aot_eager")
    assert set(r) == {"Q4_K", "Q5_K", "Q6_K", "FP8_ROWS"}, r
    for result in r.values():
        assert result["graphs"] == 1 and result["breaks"] == 0, r
        assert result["max_diff"] <= 1e-5 * result["scale"], r


def test_fp8_group_lets_go_of_its_shared_quantization_on_every_path(tmp_path):
    from comfy_env import PACKAGE_NAME, REPO, run_script
    (tmp_path / "models").mkdir()
    r = run_script(tmp_path, tmp_path / "models", REPO / "tests" / "comfy_scripts" / "fp8_shared_release.py",
                   package=PACKAGE_NAME)
    assert r["groups"] == 1 and r["last"] == [False, False, True] and r["one_object"], r
    assert r["kept_by_earlier_member"], r
    assert r["released_when_last_is_patched"] and r["released_when_last_is_merged"], r
    assert r["patched_output_error"] < 1e-4, r


def test_broken_tensor_sets_named_before_the_model_is_built(models, tmp_path):
    prompts = [sampling_graph(gguf_loader(name), str(tmp_path / f"{name}.st"), 256)
               for name in ("qwen-missing.gguf", "qwen-short.gguf")]
    missing, short = run_prompts(tmp_path, models, prompts)
    m = short_error(missing["error"])
    assert not missing["success"] and "qwen-missing.gguf" in m and "missing transformer_blocks.1.attn.to_k.weight" in m, m
    m = short_error(short["error"])
    assert not short["success"] and "qwen-short.gguf" in m and \
        "transformer_blocks.2.img_mlp.net.0.proj.weight is [1023, 256], expected [1024, 256]" in m, m


def test_files_are_checked_against_every_tensor_under_the_dynamic_loader(models, tmp_path):
    # Under ComfyUI's dynamic VRAM loader its Linear layers create no weight until loaded: the model the
    # files are checked against must still show them, or every load on a GPU would warn that the file's
    # Linear weights go unused and no missing or misshaped Linear weight would be caught.
    from comfy_env import PACKAGE_NAME, REPO, run_script
    names = ["qwen-tiny-Q4_K_M.gguf", "qwen-edit-2511-tiny.gguf", "z-image-tiny-Q4_K.gguf"]
    r = run_script(tmp_path, models, REPO / "tests" / "comfy_scripts" / "expected_shapes.py", package=PACKAGE_NAME,
                   ggufs=names, root=str(models))
    for name in names:
        assert r[name]["linear_weights"] > 10, r[name]
        assert not r[name]["missing"] and not r[name]["unexpected"] and not r[name]["misshaped"], (name, r[name])
        # Nor does ComfyUI's own loading of the weights miss any (Edit-2511's marker included).
        assert not [w for w in r[name]["warnings"] if "missing" in w or "unexpected" in w or "not use" in w], r[name]
