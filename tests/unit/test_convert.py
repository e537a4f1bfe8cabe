"""The converter (``loaders.convert``): its mixes against the sizes of the files users download and
llama.cpp's rules, checkpoints of every input dtype converted through the command line and read
back against an independent decode (the ``gguf`` package's), and each refusal."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFWriter
from safetensors.torch import save_file

from comfy_env import REPO, comfyui_path
from llama_cpp_ref import expected
from tiny_models import QWEN_IMAGE, Z_IMAGE, qwen_image_shapes, random_weights, tiny_qwen, z_image_shapes
from tiny_text_encoders import HF_TO_GGUF_BLOCK, QWEN3, QWEN25VL, VISION, llm_shapes, vision_shapes
from loaders.convert import to_gguf
from loaders.convert.checkpoint import open_checkpoint, vision_pieces
from loaders.convert.recipes import FALLBACK, IMAGE_ARCHS, LEVELS, fitted, float_recipe, image_recipe, llm_recipe
from loaders.convert.to_gguf import convert
from loaders.gguf.errors import GGUFError
from loaders.gguf.writer import Planned, add_metadata
from loaders.models.diffusion import open_diffusion_model
from loaders.models.text_encoder import open_text_encoder
from loaders.models.tokenizer import gguf_tokenizer_metadata
from loaders.quant.weight import dequantize

QWEN_IMAGE_20B = dict(layers=60, heads=24, head_dim=128, text_dim=3584, mlp=12288, in_channels=64, out_channels=16)
QWEN25_VL_7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064)
QWEN3_4B = dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728, vocab=151936)
TOKENIZER = comfyui_path() / "comfy" / "text_encoders" / "qwen25_tokenizer"
needs_tokenizer = pytest.mark.skipif(not (TOKENIZER / "vocab.json").is_file(),
                                     reason=f"no Qwen tokenizer folder at {TOKENIZER} (set COMFYUI_PATH)")


def file_size(tmp_path, plan: list[Planned], arch: str, metadata: dict) -> int:
    """The size of the GGUF these tensors make, from gguf's own writer: its header, key-values and
    tensor infos written for real, then each tensor's data padded to the 32-byte alignment."""
    writer = GGUFWriter(str(tmp_path / "header.gguf"), arch=arch)
    for key, value in metadata.items():
        add_metadata(writer, key, value)
    for p in plan:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes,
                               raw_dtype=None if p.qtype == T.F32 else p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()

    def pad(n: int) -> int:
        return -(-n // 32) * 32
    return pad(os.path.getsize(tmp_path / "header.gguf")) + sum(pad(p.nbytes) for p in plan)


def metadata_of(level: str) -> dict:
    return {"general.file_type": int(LEVELS[level].file_type), "general.quantization_version": 2}


# city96/Qwen-Image-gguf's files (shared/reference/models.md): the mixes must make these very sizes.
@pytest.mark.parametrize("level,size", [("Q4_K_M", 13_065_746_976), ("Q3_K_M", 9_679_567_392),
                                        ("Q3_K_S", 8_952_609_312), ("Q2_K", 7_062_518_304),
                                        ("BF16", 40_872_114_720)])
def test_city96_mixes_make_the_real_files_sizes(tmp_path, level, size):
    shapes = qwen_image_shapes(**QWEN_IMAGE_20B)
    recipe = image_recipe(LEVELS[level], IMAGE_ARCHS["qwen_image"], 60, T.BF16)
    plan = [Planned(n, s, recipe(n, s)) for n, s in shapes.items()]
    # city96's files carry a few more key-values (a name, a file type) than ours: a few hundred bytes.
    assert 0 <= size - file_size(tmp_path, plan, "qwen_image", metadata_of(level)) < 1024


# QuantStack's (listed to a tenth of a GB) of the same recipe.
@pytest.mark.parametrize("level,gb", [("Q5_K_M", 14.9), ("Q6_K", 16.8)])
def test_larger_mixes_make_the_listed_sizes(tmp_path, level, gb):
    recipe = image_recipe(LEVELS[level], IMAGE_ARCHS["qwen_image"], 60, T.BF16)
    plan = [Planned(n, s, recipe(n, s)) for n, s in qwen_image_shapes(**QWEN_IMAGE_20B).items()]
    assert round(file_size(tmp_path, plan, "qwen_image", metadata_of(level)) / 1e9, 1) == gb


def hf_to_gguf_names(shapes: dict) -> dict:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    out = {}
    for name, shape in shapes.items():
        if name in top:
            out[top[name]] = shape
        else:
            _, _, layer, rest = name.split(".", 3)
            kind, part = rest.rsplit(".", 1)
            out[f"blk.{layer}.{HF_TO_GGUF_BLOCK[kind]}.{part}"] = shape
    return out


# unsloth's llama.cpp files (shared/reference/models.md).
@needs_tokenizer
@pytest.mark.parametrize("model,level,size", [("qwen2vl", "Q4_K_M", 4_683_072_384), ("qwen2vl", "Q5_K_M", 5_444_830_080),
                                              ("qwen3", "Q4_K_M", 2_497_281_120)])
def test_llama_cpp_mixes_make_the_real_text_encoder_sizes(tmp_path, model, level, size):
    spec = QWEN25_VL_7B if model == "qwen2vl" else QWEN3_4B
    shapes = hf_to_gguf_names(llm_shapes(**spec, qk_norm=model == "qwen3", bias=model != "qwen3",
                                         head=model == "qwen2vl"))
    recipe = llm_recipe(LEVELS[level], spec["layers"], spec["heads"] // spec["kv_heads"], tied=model == "qwen3")
    plan = [Planned(n, s, recipe(n, s)) for n, s in shapes.items()]
    meta = {**metadata_of(level), **gguf_tokenizer_metadata(TOKENIZER, spec["vocab"])}
    # Theirs also hold a chat template and names: some kilobytes. A tensor one type off is megabytes.
    assert 0 <= size - file_size(tmp_path, plan, model, meta) < 64 * 1024


def test_the_mmproj_makes_the_real_files_size(tmp_path):
    # unsloth's mmproj-F16.gguf of Qwen2.5-VL-7B: 1,354,163,040 bytes.
    hf = vision_shapes(hidden=1280, layers=32, heads=16, intermediate=3420, patch=14, out=3584)
    pieces = vision_pieces({k: k for k in hf})
    shapes = {n: tuple(piece(torch.empty(hf[key], device="meta")).shape) for n, (key, piece) in pieces.items()}
    plan = [Planned(n, s, float_recipe(T.F16)(n, s)) for n, s in shapes.items()]
    assert 0 <= 1_354_163_040 - file_size(tmp_path, plan, "clip", {"general.file_type": 1}) < 4096


def test_llama_cpp_rules_for_the_protected_layers():
    pick = llm_recipe(LEVELS["Q4_K_M"], 28, 7, tied=False)
    # use_more_bits: the first and last eighth, and every third layer between.
    protected = [i for i in range(28) if pick(f"blk.{i}.attn_v.weight", (512, 3584)) == T.Q6_K]
    assert protected == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
    assert pick("blk.3.ffn_down.weight", (3584, 18944)) == T.Q4_K
    assert pick("output.weight", (152064, 3584)) == T.Q6_K
    assert pick("token_embd.weight", (152064, 3584)) == T.Q4_K
    assert pick("blk.0.attn_norm.weight", (3584,)) == T.F32 and pick("blk.0.attn_q.bias", (3584,)) == T.F32
    q3m = llm_recipe(LEVELS["Q3_K_M"], 28, 7, tied=False)
    assert [q3m(f"blk.{i}.attn_v.weight", (512, 3584)) for i in range(3)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    assert q3m("blk.0.ffn_down.weight", (3584, 18944)) == T.Q5_K and q3m("blk.9.ffn_down.weight", (3584, 18944)) == T.Q4_K
    assert q3m("blk.9.attn_output.weight", (3584, 3584)) == T.Q4_K
    q2k = llm_recipe(LEVELS["Q2_K"], 28, 7, tied=True)
    assert q2k("blk.4.attn_v.weight", (512, 3584)) == T.Q4_K and q2k("token_embd.weight", (152064, 3584)) == T.Q6_K


# llama.cpp's tensor_type_fallback (vendored in llama-cpp-python 0.3.36).
@pytest.mark.parametrize("wanted,row,got", [(T.Q4_K, 96, T.Q5_0), (T.Q5_K, 96, T.Q5_1), (T.Q6_K, 96, T.Q8_0),
                                            (T.Q2_K, 96, T.Q4_0), (T.Q3_K, 96, T.Q4_0), (T.IQ4_XS, 96, T.IQ4_NL),
                                            (T.Q4_K, 40, T.F16), (T.Q8_0, 40, T.F16), (T.Q4_K, 512, T.Q4_K)])
def test_a_row_a_type_cannot_take_falls_back_as_llama_cpp(wanted, row, got):
    assert fitted(wanted, (8, row)) == got


def test_every_type_with_a_fallback_in_llama_cpp_has_it():
    assert set(FALLBACK) == {T.IQ4_XS, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


# The README's recipe table: (bulk, v projections and MLP outputs, first and last block); Q2_K raises the
# v projections alone, to Q3_K.
TABLE = {"Q2_K": (T.Q2_K, T.Q2_K, T.Q4_K), "Q3_K_S": (T.Q3_K, T.Q3_K, T.Q4_K), "Q3_K_M": (T.Q3_K, T.Q4_K, T.Q4_K),
         "Q4_K_S": (T.Q4_K, T.Q4_K, T.Q5_K), "Q4_K_M": (T.Q4_K, T.Q6_K, T.Q5_K), "Q5_K_S": (T.Q5_K, T.Q5_K, T.Q6_K),
         "Q5_K_M": (T.Q5_K, T.Q6_K, T.Q6_K), "Q6_K": (T.Q6_K,) * 3, "Q8_0": (T.Q8_0,) * 3, "Q5_0": (T.Q5_0,) * 3,
         "Q5_1": (T.Q5_1,) * 3, "Q4_0": (T.Q4_0,) * 3, "Q4_1": (T.Q4_1,) * 3, "IQ4_NL": (T.IQ4_NL,) * 3,
         "IQ4_XS": (T.IQ4_XS,) * 3, "BF16": (T.BF16,) * 3, "F16": (T.F16,) * 3}


def test_the_table_covers_every_level():
    assert set(TABLE) == set(LEVELS)


def check_read_back(gguf_path, values: dict, level: str, layers: int, half: T = T.F16,
                    arch: str = "qwen_image") -> dict[str, T]:
    """Each tensor in its table type (``half``: the input's 16-bit type) and equal to the independent
    decode of the input's values."""
    reader = GGUFReader(str(gguf_path))
    types = {t.name: T(t.tensor_type) for t in reader.tensors}
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    bulk, sensitive, edges = TABLE[level]
    for name, qtype in types.items():
        shape = tuple(values[name].shape)
        if len(shape) != 2 or np.prod(shape) <= 1024:
            want = T.F32
        elif bulk in (T.BF16, T.F16):
            want = bulk
        elif name.startswith(IMAGE_ARCHS[arch].unquantized):
            want = half
        elif name.startswith(("transformer_blocks.0.", f"transformer_blocks.{layers - 1}.")):
            want = edges
        elif level == "Q2_K" and name.endswith(IMAGE_ARCHS[arch].value):
            want = T.Q3_K
        elif name.endswith(IMAGE_ARCHS[arch].sensitive):
            want = sensitive
        else:
            want = bulk
        assert qtype == fitted(want, shape), (name, qtype, want)
    model = open_diffusion_model(str(gguf_path))
    for name, value in values.items():
        got = dequantize(model.state_dict[name], torch.float32).numpy()
        np.testing.assert_array_equal(got, expected(value, types[name]), err_msg=name)
    return types


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "fp8 scaled", "fp8 comfy_quant", "fp8 metadata"])
def test_every_input_dtype_converts(tmp_path, dtype):
    source, values = tiny_qwen(tmp_path, dtype)
    out = tmp_path / "out.gguf"
    if dtype == "bf16":  # through the command line, as a user runs it
        run = subprocess.run([sys.executable, "-m", "loaders.convert", str(source), str(out), "--type", "Q4_K_M"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        assert "Qwen-Image diffusion model" in run.stderr and "written as out.gguf" in run.stderr
        assert "[##############################]" in run.stderr  # the progress bar reached its end
        # Not a terminal (captured, as in a log): whole lines, at most one per tenth of the way.
        bars = [line for line in run.stderr.splitlines() if line.startswith("[")]
        assert "\r" not in run.stderr and 2 <= len(bars) <= 11, run.stderr
    else:
        convert(open_checkpoint(source), out, "Q4_K_M")
    check_read_back(out, values, "Q4_K_M", QWEN_IMAGE["layers"], T.BF16 if dtype == "bf16" else T.F16)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert out.stat().st_mode & 0o777 == 0o666 & ~to_gguf._umask()  # as any file the user makes


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv != "Q4_K_M"])
def test_every_level_reads_back_as_its_table_says(tmp_path, level):
    source, values = tiny_qwen(tmp_path, "fp32")
    convert(open_checkpoint(source), tmp_path / "out.gguf", level)
    check_read_back(tmp_path / "out.gguf", values, level, QWEN_IMAGE["layers"])


def test_edit_2511_keeps_its_marker(tmp_path):
    source, values = tiny_qwen(tmp_path, "bf16", extra={"__index_timestep_zero__": torch.empty(0)})
    convert(open_checkpoint(source), tmp_path / "edit.gguf", "Q8_0")
    assert open_diffusion_model(str(tmp_path / "edit.gguf")).variant == "Qwen-Image-Edit-2511"


def test_z_image_in_its_original_names_is_written_fused(tmp_path):
    weights = random_weights(z_image_shapes(**Z_IMAGE), 1)
    original = {}
    for name, w in weights.items():
        if name.endswith("attention.qkv.weight"):
            for part, rows in zip("qkv", np.split(w, 3)):
                original[name.replace("qkv", f"to_{part}")] = torch.from_numpy(rows.copy())
        else:
            original[name.replace("attention.q_norm.", "attention.norm_q.").replace("attention.k_norm.", "attention.norm_k.")
                     .replace("attention.out.", "attention.to_out.0.")] = torch.from_numpy(w)
    save_file(original, str(tmp_path / "z.safetensors"))
    ckpt = open_checkpoint(tmp_path / "z.safetensors")
    assert (ckpt.arch, ckpt.variant, ckpt.layers) == ("lumina2", "Z-Image", Z_IMAGE["layers"])
    convert(ckpt, tmp_path / "z.gguf", "Q4_K_M")
    types = {t.name: T(t.tensor_type) for t in GGUFReader(str(tmp_path / "z.gguf")).tensors}
    assert types["layers.1.feed_forward.w2.weight"] == T.Q6_K and types["layers.1.attention.qkv.weight"] == T.Q4_K
    assert types["layers.0.attention.qkv.weight"] == T.Q5_K and types["x_embedder.weight"] == T.F16
    model = open_diffusion_model(str(tmp_path / "z.gguf"))
    for name, w in weights.items():
        np.testing.assert_array_equal(dequantize(model.state_dict[name], torch.float32).numpy(),
                                      expected(torch.from_numpy(w), types[name]), err_msg=name)


@needs_tokenizer
@pytest.mark.parametrize("arch,spec", [("qwen2vl", QWEN25VL), ("qwen3", QWEN3)])
def test_text_encoders_are_written_in_llama_cpp_names(tmp_path, arch, spec):
    weights = random_weights(llm_shapes(**spec, qk_norm=arch == "qwen3", bias=arch != "qwen3"), 2)
    stored = {k: torch.from_numpy(v) for k, v in weights.items()}
    vision = {}
    if arch == "qwen2vl":  # Comfy-Org's file holds the vision tower too: written as an mmproj of its own
        vision = random_weights(vision_shapes(**VISION, out=spec["hidden"]), 3)
        stored.update({k: torch.from_numpy(v) for k, v in vision.items()})
    save_file(stored, str(tmp_path / "te.safetensors"))
    out, mmproj = tmp_path / "te.gguf", tmp_path / "mmproj-te.gguf"
    run = subprocess.run([sys.executable, "-m", "loaders.convert", str(tmp_path / "te.safetensors"), str(out),
                          "--type", "Q8_0", "--tokenizer", str(TOKENIZER)] + (["--mmproj", str(mmproj)] if vision else []),
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    reader = GGUFReader(str(out))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    types = {t.name: T(t.tensor_type) for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == T.Q8_0 and types["blk.0.attn_norm.weight"] == T.F32
    assert types["token_embd.weight"] == T.Q8_0
    te = open_text_encoder(str(out))
    assert te.tokenizer is not None and te.tokenizer.encode("a red fox").ids
    gguf_names = hf_to_gguf_names({k: None for k in weights})
    for gguf_name, hf_name in zip(gguf_names, weights):
        value = torch.from_numpy(weights[hf_name])
        got = dequantize(te.state_dict[hf_name], torch.float32).numpy()
        np.testing.assert_array_equal(got, expected(value, types[gguf_name]), err_msg=hf_name)
    if vision:  # read back as this package's loader reads llama.cpp's mmproj files
        te = open_text_encoder(str(out), str(mmproj))
        assert te.vision.num_layers == VISION["layers"] and te.vision.num_heads == VISION["hidden"] // 80
        for name, value in vision.items():
            want = value if value.ndim == 1 else value.astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(dequantize(te.state_dict[name], torch.float32).numpy(), want,
                                          err_msg=name)


def test_a_text_encoder_without_a_tokenizer_is_refused_on_the_command_line(tmp_path):
    weights = random_weights(llm_shapes(**{**QWEN3, "vocab": 512}, qk_norm=True, bias=False), 2)
    save_file({k: torch.from_numpy(v) for k, v in weights.items()}, str(tmp_path / "te.safetensors"))
    run = subprocess.run([sys.executable, "-m", "loaders.convert", str(tmp_path / "te.safetensors")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "te.safetensors: a text encoder needs --tokenizer" in run.stderr, run.stderr
    assert not (tmp_path / "te-Q4_K_M.gguf").exists()


def test_an_existing_output_is_kept_unless_overwriting_is_asked(tmp_path):
    source, _ = tiny_qwen(tmp_path, "bf16")
    out = tmp_path / "taken.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(GGUFError, match="taken.gguf: already exists"):
        convert(open_checkpoint(source), out, "Q8_0")
    assert out.read_bytes() == b"mine"
    convert(open_checkpoint(source), out, "Q8_0", overwrite=True)
    assert open_diffusion_model(str(out)).variant == "Qwen-Image"


def test_non_finite_weights_are_refused_naming_the_input_and_tensor(tmp_path):
    source, _ = tiny_qwen(tmp_path, "fp32", extra={"transformer_blocks.1.attn.to_k.weight": torch.full((256, 256), float("nan"))})
    with pytest.raises(GGUFError, match=r"qwen-fp32.safetensors: tensor transformer_blocks.1.attn.to_k.weight holds "
                                        r"65,536 non-finite"):
        convert(open_checkpoint(source), tmp_path / "out.gguf", "Q4_K_M")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen-fp32.safetensors"]


@pytest.mark.parametrize("case,fragment", [
    ("vae", "unknown architecture"),
    ("truncated", "not a readable safetensors file"),
    ("nvfp4", "stored in ComfyUI's 'nvfp4' format, which cannot be converted"),
    ("missing", "no such file"),
    ("lumina", "not Z-Image"),
])
def test_inputs_that_cannot_be_converted_are_named(tmp_path, case, fragment):
    path = tmp_path / f"{case}.safetensors"
    if case == "vae":
        save_file({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(path))
    elif case == "truncated":
        source, _ = tiny_qwen(tmp_path, "bf16")
        path.write_bytes(source.read_bytes()[:5000])
    elif case == "nvfp4":
        save_file({"txt_norm.weight": torch.ones(4), "img_in.weight": torch.zeros(4, 4, dtype=torch.uint8),
                   "img_in.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}, str(path))
    elif case == "lumina":  # Lumina 2 itself: its timestep embedder ends in the model width
        shapes = z_image_shapes(**{**Z_IMAGE, "heads": 2, "head_dim": 128})
        shapes["t_embedder.mlp.2.weight"] = (256, 256)
        save_file({k: torch.zeros(v) for k, v in shapes.items() if "pad_token" not in k}, str(path))
    with pytest.raises(GGUFError, match=fragment) as e:
        open_checkpoint(path)
    assert str(e.value).startswith(f"{case}.safetensors: ")


def test_a_disk_too_small_is_said_before_writing(tmp_path, monkeypatch):
    source, _ = tiny_qwen(tmp_path, "bf16")
    monkeypatch.setattr(to_gguf.shutil, "disk_usage", lambda folder: SimpleNamespace(free=1000))
    with pytest.raises(GGUFError, match=r"qwen-bf16.safetensors: the Q4_K_M file needs .* GB and .* has 0.00 GB free"):
        convert(open_checkpoint(source), tmp_path / "out.gguf", "Q4_K_M")
    assert not (tmp_path / "out.gguf").exists()


def test_a_disk_filling_up_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    source, _ = tiny_qwen(tmp_path, "bf16")
    from loaders.gguf import writer
    calls = []
    original = writer.GGUFWriter.write_tensor_data

    def full(self, tensor, *args):
        calls.append(1)
        if len(calls) == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, tensor, *args)
    monkeypatch.setattr(writer.GGUFWriter, "write_tensor_data", full)
    with pytest.raises(GGUFError, match="qwen-bf16.safetensors: the disk of .* is full"):
        convert(open_checkpoint(source), tmp_path / "out.gguf", "Q4_K_M")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen-bf16.safetensors"]


def test_a_tensor_that_cannot_be_read_is_named(tmp_path):
    source, _ = tiny_qwen(tmp_path, "bf16")
    ckpt = open_checkpoint(source)
    load = ckpt.load
    ckpt.load = lambda name: (_ for _ in ()).throw(RuntimeError("bad bytes")) if name.endswith("to_k.weight") else load(name)
    with pytest.raises(GGUFError, match=r"qwen-bf16.safetensors: tensor transformer_blocks.0.attn.to_k.weight cannot "
                                        r"be read \(RuntimeError: bad bytes\)"):
        convert(ckpt, tmp_path / "out.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen-bf16.safetensors"]


def test_an_all_in_one_checkpoint_gives_its_diffusion_model(tmp_path):
    weights = random_weights(qwen_image_shapes(**QWEN_IMAGE), 0)
    stored = {f"model.diffusion_model.{k}": torch.from_numpy(v) for k, v in weights.items()}
    stored["first_stage_model.decoder.conv_in.weight"] = torch.zeros(8, 4, 3, 3)
    stored["text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    save_file(stored, str(tmp_path / "all.safetensors"))
    ckpt = open_checkpoint(tmp_path / "all.safetensors")
    assert ckpt.kind == "diffusion_model" and set(ckpt.shapes) == set(weights)



def damaged(weights: dict, case: str) -> dict:
    """A tiny Qwen-Image's tensors with one fault."""
    w = {k: torch.from_numpy(v) for k, v in weights.items()}
    if case == "a block tensor missing":
        del w["transformer_blocks.1.attn.to_v.weight"]
    elif case == "a block tensor mis-shaped":
        w["transformer_blocks.1.attn.to_v.weight"] = torch.zeros(256, 200)
    elif case == "an empty tensor":
        w["transformer_blocks.1.attn.to_q.weight"] = torch.zeros(0, 256)
    elif case == "blocks numbered with a gap":
        w = {k.replace("transformer_blocks.2.", "transformer_blocks.5."): v for k, v in w.items()}
    elif case == "integer weights":
        w["transformer_blocks.1.attn.to_q.weight"] = torch.zeros(256, 256, dtype=torch.int32)
    elif case == "a tensor of no known part":
        w["extra.weight"] = torch.zeros(4)
    return w


@pytest.mark.parametrize("case,fragment", [
    ("a block tensor missing", "missing transformer_blocks.1.attn.to_v.weight"),
    ("a block tensor mis-shaped", "transformer_blocks.1.attn.to_v.weight is [256, 200], its other blocks' [256, 256]"),
    ("an empty tensor", "transformer_blocks.1.attn.to_q.weight is empty"),
    ("blocks numbered with a gap", "transformer_blocks blocks are numbered [0, 1, 5], not 0 to 2"),
    ("integer weights", "transformer_blocks.1.attn.to_q.weight holds I32 values"),
    ("a tensor of no known part", "unexpected extra.weight"),
])
def test_damaged_models_are_refused_before_anything_is_written(tmp_path, case, fragment):
    save_file(damaged(random_weights(qwen_image_shapes(**QWEN_IMAGE), 0), case), str(tmp_path / "bad.safetensors"))
    with pytest.raises(GGUFError, match=re.escape(fragment)) as e:
        open_checkpoint(tmp_path / "bad.safetensors")
    assert str(e.value).startswith("bad.safetensors: ")


def test_values_beyond_a_block_types_scales_are_refused(tmp_path):
    # Finite in the input, but Q8_0's f16 scale of 1e7 / 127 is infinite: the file would decode to inf.
    source, _ = tiny_qwen(tmp_path, "fp32", extra={"transformer_blocks.1.attn.to_q.weight": torch.full((256, 256), 1e7)})
    with pytest.raises(GGUFError, match="transformer_blocks.1.attn.to_q.weight holds values too large for Q8_0's"):
        convert(open_checkpoint(source), tmp_path / "out.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen-fp32.safetensors"]


def test_outputs_that_cannot_be_written_are_named(tmp_path, monkeypatch):
    source, _ = tiny_qwen(tmp_path, "bf16")
    (tmp_path / "a folder").mkdir()
    with pytest.raises(GGUFError, match="a folder is a folder"):
        convert(open_checkpoint(source), tmp_path / "a folder", "Q8_0", overwrite=True)
    from loaders.gguf import writer

    def refused(self, tensor, *args):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(writer.GGUFWriter, "write_tensor_data", refused)
    with pytest.raises(GGUFError, match=r"out.gguf: cannot be written \(Permission denied\)"):
        convert(open_checkpoint(source), tmp_path / "out.gguf", "Q8_0")

    def short(self, tensor, *args):
        raise OSError("786432 requested and 424672 written")  # numpy's tofile on a full disk: no errno
    monkeypatch.setattr(writer.GGUFWriter, "write_tensor_data", short)
    with pytest.raises(GGUFError, match="qwen-bf16.safetensors: the disk of .* is full"):
        convert(open_checkpoint(source), tmp_path / "out.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a folder", "qwen-bf16.safetensors"]


@pytest.mark.parametrize("args,fragment", [
    (["--device", "bogus"], "--device bogus: not a torch device"),
    (["--mmproj", "mm.gguf"], "no Qwen2.5-VL vision tower here"),
])
def test_command_line_refusals_come_before_anything_is_written(tmp_path, args, fragment):
    source, _ = tiny_qwen(tmp_path, "bf16")
    run = subprocess.run([sys.executable, "-m", "loaders.convert", str(source), str(tmp_path / "out.gguf"), *args],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 1 and fragment in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen-bf16.safetensors"]
