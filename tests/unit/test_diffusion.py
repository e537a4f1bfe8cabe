"""Diffusion-model GGUFs: configs read from the weights, name maps, and wrong-kind files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file

from loaders.models.diffusion import open_diffusion_model
from loaders.gguf.errors import GGUFError
from loaders.gguf.reader import GGUFFile
from loaders.quant.weight import GGMLTensor, dequantize
from loaders.convert.recipes import uniform_recipe
from loaders.gguf.writer import write_gguf
from tiny_models import (QWEN_IMAGE, Z_IMAGE, qwen_image_recipe, qwen_image_shapes, random_weights, write_model,
                         z_image_shapes)


@pytest.fixture(scope="module")
def qwen_weights():
    return random_weights(qwen_image_shapes(**QWEN_IMAGE), seed=0)


@pytest.mark.parametrize("bulk", [T.Q4_K, T.Q8_0, T.BF16])
def test_weights_decode_to_the_twin(tmp_path, qwen_weights, bulk):
    chosen = write_model(tmp_path / "m.gguf", qwen_weights, qwen_image_recipe(bulk), twin=str(tmp_path / "m.st"))
    if bulk == T.Q4_K:  # city96's Q4_K_M mix
        assert chosen["transformer_blocks.1.attn.to_q.weight"] == T.Q4_K
        assert chosen["transformer_blocks.1.attn.to_v.weight"] == T.Q6_K
        assert chosen["transformer_blocks.0.attn.to_q.weight"] == T.Q5_K
        assert chosen["img_in.weight"] == T.F16
    dm = open_diffusion_model(str(tmp_path / "m.gguf"))
    twin = load_file(str(tmp_path / "m.st"))
    assert set(dm.state_dict) == set(twin)
    for key, value in dm.state_dict.items():
        if chosen[key] not in (T.F32, T.F16, T.BF16):
            assert isinstance(value, GGMLTensor)
        np.testing.assert_array_equal(dequantize(value, torch.float32).numpy(), twin[key], err_msg=key)


def test_qwen_image_config_from_shapes(tmp_path, qwen_weights):
    write_model(tmp_path / "m.gguf", qwen_weights, qwen_image_recipe())
    dm = open_diffusion_model(str(tmp_path / "m.gguf"))
    assert dm.family == "qwen_image" and dm.variant == "Qwen-Image"
    assert dm.unet_config == {
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 3,
        "attention_head_dim": 64, "num_attention_heads": 4, "joint_attention_dim": 256,
        "axes_dims_rope": (8, 28, 28)}


def test_full_size_qwen_image_config_matches_comfyui_defaults():
    shapes = qwen_image_shapes(layers=60, heads=24, head_dim=128, text_dim=3584, mlp=12288, in_channels=64,
                               out_channels=16)
    from loaders.models.diffusion import qwen_image_config
    sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    config, _ = qwen_image_config(sd, "full.gguf")
    assert config["num_layers"] == 60 and config["num_attention_heads"] == 24
    assert config["attention_head_dim"] == 128 and config["joint_attention_dim"] == 3584
    assert config["axes_dims_rope"] == (16, 56, 56)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["city96", "sdcpp"])
def test_edit_2511_marker(tmp_path, qwen_weights, prefix):
    # As unsloth's Edit-2511 files carry it: F32 with shape [0], a valid zero-element tensor.
    marker = {prefix + "__index_timestep_zero__": np.zeros(0, dtype=np.float32)}
    write_model(tmp_path / "e.gguf", qwen_weights, qwen_image_recipe(), prefix=prefix, extra_tensors=marker,
                arch="qwen_image" if not prefix else None)
    assert GGUFFile(str(tmp_path / "e.gguf")).tensors[prefix + "__index_timestep_zero__"].shape == (0,)
    dm = open_diffusion_model(str(tmp_path / "e.gguf"))
    assert dm.variant == "Qwen-Image-Edit-2511"
    assert dm.unet_config["default_ref_method"] == "index_timestep_zero"
    # Kept for ComfyUI's model, which holds the marker as an empty buffer.
    assert dm.state_dict["__index_timestep_zero__"].numel() == 0
    assert set(dm.state_dict) == set(qwen_weights) | {"__index_timestep_zero__"}


def test_sdcpp_prefix_and_no_architecture(tmp_path, qwen_weights):
    write_model(tmp_path / "s.gguf", qwen_weights, qwen_image_recipe(), arch=None, prefix="model.diffusion_model.")
    dm = open_diffusion_model(str(tmp_path / "s.gguf"))
    assert dm.naming.startswith("stable-diffusion.cpp")
    assert set(dm.state_dict) == set(qwen_weights)


def test_z_image_config_and_original_names(tmp_path):
    weights = random_weights(z_image_shapes(**Z_IMAGE), seed=1)
    write_model(tmp_path / "z.gguf", weights, uniform_recipe(T.Q4_K), arch="lumina2")
    dm = open_diffusion_model(str(tmp_path / "z.gguf"))
    assert dm.family == "z_image"
    c = dm.unet_config
    assert (c["dim"], c["n_heads"], c["n_kv_heads"], c["n_layers"], c["cap_feat_dim"]) == (256, 4, 4, 3, 256)
    assert int(c["ffn_dim_multiplier"] * c["dim"]) == Z_IMAGE["ffn"] and c["pad_tokens_multiple"] == 32
    assert sum(c["axes_dims"]) == Z_IMAGE["head_dim"]

    # Tongyi's original naming: q, k and v apart, fused here without leaving the quantized format.
    original = {}
    for key, value in weights.items():
        if key.endswith("attention.qkv.weight"):
            base = key[: -len("qkv.weight")]
            for name, part in zip(("to_q", "to_k", "to_v"), np.split(value, 3)):
                original[f"{base}{name}.weight"] = part
            continue
        key = key.replace("attention.q_norm.", "attention.norm_q.").replace("attention.k_norm.", "attention.norm_k.")
        key = key.replace("attention.out.", "attention.to_out.0.").replace("x_embedder.", "all_x_embedder.2-1.")
        original[key.replace("final_layer.", "all_final_layer.2-1.")] = value
    write_model(tmp_path / "zo.gguf", original, uniform_recipe(T.Q4_K), arch="lumina2")
    do = open_diffusion_model(str(tmp_path / "zo.gguf"))
    assert set(do.state_dict) == set(dm.state_dict)
    fused = do.state_dict["layers.0.attention.qkv.weight"]
    assert isinstance(fused, GGMLTensor) and fused.fmt.qtype == T.Q4_K
    for key in dm.state_dict:
        assert torch.equal(dequantize(do.state_dict[key], torch.float32), dequantize(dm.state_dict[key], torch.float32))

    # Damaged original names (found by fuzzing): each gets a message naming the file and the tensors.
    base = "layers.0.attention."
    bad = {"no_k": ({k: v for k, v in original.items() if k != base + "to_k.weight"}, "to_k.weight missing beside"),
           "lone_bias": ({**original, base + "to_q.bias": np.zeros(256, np.float32)}, "to_k.bias, "),
           "narrow_k": ({**original, base + "to_k.weight": original[base + "to_k.weight"][:, :128]}, "differ past")}
    for name, (tensors, fragment) in bad.items():
        write_model(tmp_path / f"{name}.gguf", tensors, uniform_recipe(T.Q8_0), arch="lumina2")
        with pytest.raises(GGUFError) as info:
            open_diffusion_model(str(tmp_path / f"{name}.gguf"))
        assert f"{name}.gguf" in str(info.value) and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("key", ["img_in.weight", "transformer_blocks.0.attn.norm_q.weight"])
def test_a_tensor_of_the_wrong_rank_is_named(tmp_path, qwen_weights, key):
    # Found by fuzzing: a 1-D img_in (or a 2-D norm) reached the config's indexing.
    value = qwen_weights[key]
    damaged = {**qwen_weights, key: value.reshape(-1) if value.ndim == 2 else value.reshape(2, -1)}
    write_model(tmp_path / "bad.gguf", damaged, uniform_recipe(T.Q8_0))
    with pytest.raises(GGUFError) as info:
        open_diffusion_model(str(tmp_path / "bad.gguf"))
    assert "bad.gguf" in str(info.value) and f"tensor '{key}' has shape" in str(info.value), str(info.value)


@pytest.mark.parametrize("arch, tensors, fragment", [
    ("qwen2vl", {"token_embd.weight": (8, 256), "blk.0.attn_q.weight": (256, 256)}, "Qwen2.5-VL language model"),
    ("clip", {"v.blk.0.attn_q.weight": (256, 256), "mm.0.weight": (256, 256)}, "mmproj vision projector"),
    ("llama", {"token_embd.weight": (8, 256), "blk.0.attn_q.weight": (256, 256)},
     "this is a llama language model (llama.cpp), not a Qwen-Image or Z-Image diffusion model"),
    ("flux", {"double_blocks.0.img_attn.qkv.weight": (256, 256)}, "architecture 'flux'"),
    ("qwen_image", {"transformer_blocks.0.attn.to_q.weight": (256, 256), "txt_norm.weight": (256,)},
     "an incomplete Qwen-Image GGUF (its header says 'qwen_image', but it lacks the img_in.weight tensor)"),
    ("lumina2", {"layers.0.attention.qkv.weight": (768, 256)},
     "lacks the cap_embedder.1.weight tensor"),
])
def test_wrong_kind_of_file(tmp_path, arch, tensors, fragment):
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, {k: np.zeros(v, np.float32) for k, v in tensors.items()}, uniform_recipe(T.Q8_0), arch=arch)
    with pytest.raises(GGUFError) as info:
        open_diffusion_model(str(path))
    assert path.name in str(info.value) and fragment in str(info.value)
