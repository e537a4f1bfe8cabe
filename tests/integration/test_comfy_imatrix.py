"""Importance matrices in real ComfyUI: collected while KSampler runs (from our MODEL and from
ComfyUI's native one of the same weights: the same matrix), saved in llama.cpp's format, and used by
the GGUF saver, without changing what the sampler computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader
from safetensors.torch import load_file

from comfy_env import requires_comfyui, run_prompts
from comfy_graphs import gguf_loader, native_loader, sampling_graph, short_error
from tiny_models import QWEN_IMAGE, qwen_image_recipe, qwen_image_shapes, random_weights, write_model
from loaders.convert.imatrix import read_importance, read_sums
from loaders.quant.formats import FORMATS

pytestmark = requires_comfyui

COLLECT = ("QwenImageGGUFCollectImportance", {})


def collected(loader: dict, latent: str, name: str) -> dict:
    graph = sampling_graph(loader, latent, 256, patches=(COLLECT,))
    graph["imsave"] = {"class_type": "QwenImageGGUFSaveImportance",
                       "inputs": {"importance": ["patch0", 1], "samples": ["sampler", 0], "filename": name,
                                  "replace": False}}
    return graph


def save(name: str, imatrix: str | None) -> dict:
    inputs = {"model": ["loader", 0], "type": "Q4_K_S", "filename": name, "overwrite": False}
    if imatrix:
        inputs["importance_matrix"] = imatrix
    return {"loader": gguf_loader("qwen-tiny-Q4_K_M.gguf"), "save": {"class_type": "QwenImageGGUFSave", "inputs": inputs}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "diffusion_models").mkdir()
    (root / "imatrix").mkdir()
    write_model(root / "diffusion_models" / "qwen-tiny-Q4_K_M.gguf", random_weights(qwen_image_shapes(**QWEN_IMAGE), 0),
                qwen_image_recipe(), twin=str(root / "diffusion_models" / "qwen-tiny.safetensors"))
    native = native_loader(root, "qwen-tiny-Q4_K_M.gguf", "qwen-tiny.safetensors", "qwen_image")
    work = tmp_path_factory.mktemp("comfy")
    first = run_prompts(work, root, [
        collected(gguf_loader("qwen-tiny-Q4_K_M.gguf"), str(work / "collecting.safetensors"), "ours"),
        collected(native, str(work / "native.safetensors"), "native"),
        sampling_graph(gguf_loader("qwen-tiny-Q4_K_M.gguf"), str(work / "plain.safetensors"), 256),
    ])
    for result in first:
        assert result["success"], short_error(result["error"])
    after_first = read_sums(root / "imatrix" / "ours.imatrix.gguf")
    # A new process: the saver's list of matrices is read when ComfyUI describes its nodes; a new
    # collector saving under the same name adds to the file (the same prompt again: the same means).
    second = run_prompts(work, root, [save("weighted", "ours.imatrix.gguf"), save("plain", None),
                                      collected(gguf_loader("qwen-tiny-Q4_K_M.gguf"), str(work / "again.safetensors"),
                                                "ours")])
    for result in second:
        assert result["success"], short_error(result["error"])
    dm = root / "diffusion_models"
    return {"ours": read_importance(root / "imatrix" / "ours.imatrix.gguf"), "after_first": after_first,
            "after_second": read_sums(root / "imatrix" / "ours.imatrix.gguf"),
            "native": read_importance(root / "imatrix" / "native.imatrix.gguf"),
            "model": {t.name: t for t in GGUFReader(str(dm / "qwen-tiny-Q4_K_M.gguf")).tensors},
            "weighted": {t.name: t for t in GGUFReader(str(dm / "weighted-Q4_K_S.gguf")).tensors},
            "plain": {t.name: t for t in GGUFReader(str(dm / "plain-Q4_K_S.gguf")).tensors},
            "latents": {n: load_file(str(work / f"{n}.safetensors"))["samples"] for n in ("collecting", "plain")}}


def test_every_linear_weight_is_collected_under_its_gguf_name(runs):
    linear = {name for name, t in runs["model"].items() if name.endswith(".weight") and len(t.shape) == 2}
    assert set(runs["ours"]) == linear
    assert all(np.isfinite(v).all() and (v >= 0).all() and v.any() for v in runs["ours"].values())


def test_our_model_and_comfyuis_native_model_collect_the_same_matrix(runs):
    assert set(runs["ours"]) == set(runs["native"])
    for name, ours in runs["ours"].items():
        native = runs["native"][name]
        np.testing.assert_allclose(ours, native, rtol=0.05, atol=1e-3 * float(native.max()), err_msg=name)


def test_collecting_does_not_change_the_sampled_latent(runs):
    assert torch.equal(runs["latents"]["collecting"], runs["latents"]["plain"])


def test_the_saver_quantizes_with_the_matrix_at_the_same_size(runs):
    weighted, plain = runs["weighted"], runs["plain"]
    assert {n: T(t.tensor_type) for n, t in weighted.items()} == {n: T(t.tensor_type) for n, t in plain.items()}
    searched = [n for n, t in weighted.items() if T(t.tensor_type) in FORMATS
                and FORMATS[T(t.tensor_type)].weighting is not None and n in runs["ours"]]
    assert searched
    differ = [n for n in searched if not np.array_equal(np.asarray(weighted[n].data), np.asarray(plain[n].data))]
    assert len(differ) > len(searched) // 2, (len(differ), len(searched))
    unweighted = [n for n, t in weighted.items() if n not in searched]
    assert all(np.array_equal(np.asarray(weighted[n].data), np.asarray(plain[n].data)) for n in unweighted)


def test_a_new_collector_adds_to_the_file_of_its_name(runs):
    first, second = runs["after_first"], runs["after_second"]
    assert first.calls > 0 and second.calls == 2 * first.calls
    assert all(second.counts[n] == 2 * first.counts[n] for n in first.counts)

