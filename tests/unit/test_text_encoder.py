"""Text-encoder and mmproj GGUFs read by the library: names, configs, and every mismatch between files."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file

from loaders.gguf.errors import GGUFError
from loaders.gguf.reader import GGUFFile, StringArray
from loaders.quant.weight import GGMLTensor, dequantize
from loaders.models.text_encoder import open_text_encoder
from loaders.models.tokenizer import build_tokenizer
from loaders.gguf.writer import write_gguf
from tiny_models import QWEN_IMAGE, qwen_image_recipe, qwen_image_shapes, random_weights, write_model
from tiny_text_encoders import QWEN3, QWEN25VL, VISION, byte_level_tokenizer, write_llm, write_mmproj

SMALL_VOCAB = 1024


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("te")
    write_llm(d / "qwen25vl.gguf", "qwen2vl", dict(QWEN25VL, vocab=SMALL_VOCAB), None, d / "qwen25vl.st")
    write_llm(d / "qwen3.gguf", "qwen3", dict(QWEN3, vocab=SMALL_VOCAB), None, d / "qwen3.st")
    write_mmproj(d / "mmproj-F16.gguf", VISION, QWEN25VL["hidden"], d / "mmproj.st")
    write_mmproj(d / "mmproj-old.gguf", VISION, QWEN25VL["hidden"], None, old_metadata=True)
    write_mmproj(d / "mmproj-Q8_0.gguf", VISION, QWEN25VL["hidden"], d / "mmproj-q8.st", qtype=T.Q8_0)
    write_mmproj(d / "mmproj-other-size.gguf", VISION, 512, None)
    write_model(d / "qwen-image.gguf", random_weights(qwen_image_shapes(**QWEN_IMAGE), 0), qwen_image_recipe())
    return d


def assert_matches_twin(sd: dict, twin: dict) -> None:
    assert set(sd) == set(twin), set(sd) ^ set(twin)
    for key, value in sd.items():
        np.testing.assert_array_equal(dequantize(value, torch.float32).numpy(), twin[key], err_msg=key)


def test_qwen25vl_with_mmproj(files):
    te = open_text_encoder(str(files / "qwen25vl.gguf"), str(files / "mmproj-F16.gguf"))
    assert te.family == "qwen25vl"
    c = te.config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (256, 2, 4, 2)
    assert (c["head_dim"], c["intermediate_size"], c["vocab_size"]) == (64, 512, SMALL_VOCAB)
    assert c["qkv_bias"] and not c["qk_norm"] and c["rope_dims"] == [8, 12, 12]
    v = te.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size, v.output_hidden_size) == (128, 2, 2, 256, 256)
    assert v.fullatt_block_indexes == [1]
    # The token table stays quantized; q/k/v of the vision tower are fused.
    assert isinstance(te.state_dict["model.embed_tokens.weight"], GGMLTensor)
    twin = {**load_file(str(files / "qwen25vl.st")), **load_file(str(files / "mmproj.st"))}
    assert_matches_twin(te.state_dict, twin)


def test_old_mmproj_metadata_and_q8_0(files):
    old = open_text_encoder(str(files / "qwen25vl.gguf"), str(files / "mmproj-old.gguf"))
    assert old.vision.fullatt_block_indexes == [1]
    q8 = open_text_encoder(str(files / "qwen25vl.gguf"), str(files / "mmproj-Q8_0.gguf"))
    twin = {**load_file(str(files / "qwen25vl.st")), **load_file(str(files / "mmproj-q8.st"))}
    assert_matches_twin(q8.state_dict, twin)


def test_qwen3(files):
    te = open_text_encoder(str(files / "qwen3.gguf"))
    assert te.family == "qwen3" and te.vision is None
    assert te.config["qk_norm"] and not te.config["qkv_bias"] and te.config["head_dim"] == 64
    assert_matches_twin(te.state_dict, load_file(str(files / "qwen3.st")))


def expect(files, llm, mmproj, *fragments):
    with pytest.raises(GGUFError) as info:
        open_text_encoder(str(files / llm), None if mmproj is None else str(files / mmproj))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_mmproj_of_another_model_size(files):
    expect(files, "qwen25vl.gguf", "mmproj-other-size.gguf", "mmproj-other-size.gguf", "qwen25vl.gguf",
           "width 512", "hidden size 256")


def test_files_swapped(files):
    # Swapped within the node that takes both: the message says which input each file goes in.
    expect(files, "mmproj-F16.gguf", None, "mmproj-F16.gguf", "mmproj vision projector", "language model",
           "it goes in mmproj_name", "in clip_name")
    expect(files, "qwen25vl.gguf", "qwen3.gguf", "qwen3.gguf", "Qwen3 language model", "mmproj", "qwen25vl.gguf",
           "it goes in clip_name", "in mmproj_name")


def test_mmproj_beside_a_text_only_model(files):
    expect(files, "qwen3.gguf", "mmproj-F16.gguf", "mmproj-F16.gguf", "qwen3.gguf", "takes no vision tower",
           "set mmproj_name to none")


def test_diffusion_model_given(files):
    expect(files, "qwen-image.gguf", None, "qwen-image.gguf", "Qwen-Image diffusion model", "UNet")


def test_mmproj_whose_full_attention_pattern_skips_every_block(tmp_path):
    write_llm(tmp_path / "qwen25vl.gguf", "qwen2vl", dict(QWEN25VL, vocab=SMALL_VOCAB), None, None)
    write_mmproj(tmp_path / "mmproj.gguf", VISION, QWEN25VL["hidden"], None,
                 metadata={"clip.vision.n_wa_pattern": 2 ** 32 - 1})
    with pytest.raises(GGUFError) as info:
        open_text_encoder(str(tmp_path / "qwen25vl.gguf"), str(tmp_path / "mmproj.gguf"))
    assert str(info.value).startswith("mmproj.gguf: corrupt header: clip.vision.n_wa_pattern is 4294967295")


def test_mmproj_without_its_last_blocks(tmp_path):
    write_llm(tmp_path / "qwen25vl.gguf", "qwen2vl", dict(QWEN25VL, vocab=SMALL_VOCAB), None, None)
    write_mmproj(tmp_path / "mmproj.gguf", VISION, QWEN25VL["hidden"], None,
                 metadata={"clip.vision.block_count": VISION["layers"] + 2})
    with pytest.raises(GGUFError) as info:
        open_text_encoder(str(tmp_path / "qwen25vl.gguf"), str(tmp_path / "mmproj.gguf"))
    assert str(info.value).startswith(f"mmproj.gguf: its header says {VISION['layers'] + 2} vision blocks "
                                      f"(clip.vision.block_count) but it holds the tensors of {VISION['layers']}")


def test_truncated_mmproj(files, tmp_path):
    data = (files / "mmproj-F16.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError) as info:
        open_text_encoder(str(files / "qwen25vl.gguf"), str(tmp_path / "cut.gguf"))
    assert "cut.gguf" in str(info.value) and "1,000 bytes are missing" in str(info.value)


def test_language_model_of_another_architecture(tmp_path):
    write_gguf(tmp_path / "gemma-3-4b-it-Q4_K_M.gguf", {"token_embd.weight": np.zeros((8, 256), np.float32),
                                                         "blk.0.attn_q.weight": np.zeros((256, 256), np.float32)},
               lambda n, s: T.F32, arch="gemma3")
    with pytest.raises(GGUFError) as info:
        open_text_encoder(str(tmp_path / "gemma-3-4b-it-Q4_K_M.gguf"))
    assert str(info.value) == ("gemma-3-4b-it-Q4_K_M.gguf: this is a gemma3 language model (llama.cpp); the text "
                               "encoder must be a Qwen language model: Qwen2.5-VL for Qwen-Image and its edit "
                               "models, Qwen3 for Z-Image")


@pytest.mark.parametrize("arch, file, metadata, warned", [
    ("qwen2", "Qwen2.5-7B-Instruct-Q4_K_M.gguf", {}, "Qwen2.5-7B-Instruct-Q4_K_M.gguf"),
    ("qwen2", "text_encoder.gguf", {"general.name": "Qwen2.5 7B Instruct"}, "Qwen2.5 7B Instruct"),
    ("qwen2", "te.gguf", {"general.name": "Qwen2-VL-7B-Instruct"}, "Qwen2-VL-7B-Instruct"),  # not 2.5
    ("qwen2", "text_encoder.gguf", {"general.name": "Qwen2.5 VL 7B Instruct"}, None),
    ("qwen2", "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf", {}, None),
    ("qwen2", "qwen_2.5_vl_7b-Q4_K_M.gguf", {"general.name": "Model"}, None),
    ("qwen2vl", "text_encoder.gguf", {}, None),
])
def test_a_plain_qwen2_not_named_vl_is_warned_about(tmp_path, caplog, arch, file, metadata, warned):
    write_llm(tmp_path / file, arch, dict(QWEN25VL, vocab=SMALL_VOCAB), None, None, metadata=metadata)
    with caplog.at_level("WARNING"):
        open_text_encoder(str(tmp_path / file))
    said = [r.getMessage() for r in caplog.records if "not Qwen2.5-VL" in r.getMessage()]
    assert len(said) == (warned is not None), said
    if warned:
        assert f"named {warned!r}" in said[0] and "gives wrong images" in said[0], said[0]


def tiny_tokenizer_file(path, pre: str = "qwen2", **changes) -> list[str]:
    """A byte-level vocabulary of the 256 byte symbols, two merges and two special tokens."""
    meta = byte_level_tokenizer(["he", "Ġhe"], [("<|im_start|>", 3), ("<think>", 4)], pre)
    tokens = meta["tokenizer.ggml.tokens"]
    write_gguf(path, {"token_embd.weight": np.zeros((len(tokens), 32), np.float32)},
               lambda n, s: T.F32, arch="qwen2", metadata=dict(meta, **changes))
    return tokens


@pytest.mark.parametrize("pre", ["deepseek-r1-qwen", "megrez"])
def test_pre_tokenizer_names_llama_cpp_reads_as_qwen2(tmp_path, pre):
    tiny_tokenizer_file(tmp_path / "qwen2.gguf")
    tiny_tokenizer_file(tmp_path / "alias.gguf", pre)
    text = "<|im_start|>he said: 'hello', 12345\n\n  x"
    assert (build_tokenizer(GGUFFile(tmp_path / "alias.gguf")).encode(text).ids
            == build_tokenizer(GGUFFile(tmp_path / "qwen2.gguf")).encode(text).ids)


def test_unknown_pre_tokenizer_is_named(tmp_path):
    tiny_tokenizer_file(tmp_path / "odd.gguf", "llama-bpe")
    with pytest.raises(GGUFError) as info:
        build_tokenizer(GGUFFile(tmp_path / "odd.gguf"))
    assert "odd.gguf" in str(info.value) and "'llama-bpe' is not supported" in str(info.value)


def test_tokenizer_rebuilt_from_metadata(tmp_path):
    tokens = tiny_tokenizer_file(tmp_path / "tok.gguf")
    tok = build_tokenizer(GGUFFile(tmp_path / "tok.gguf"))
    ids = tok.encode("<|im_start|>he he<think>").ids
    assert ids == [tokens.index("<|im_start|>"), tokens.index("he"), tokens.index("Ġhe"), tokens.index("<think>")]
    assert tok.decode(ids, skip_special_tokens=True) == "he he<think>"


@pytest.mark.parametrize("changes, fragment", [
    ({"tokenizer.ggml.merges": ["h e", "Ġ hx"]}, "merge 1 ('Ġ hx') names a token that is not in the vocabulary"),
    ({"tokenizer.ggml.merges": ["h e", "he"]}, "merge 1 ('he') names a token"),
    ({"tokenizer.ggml.tokens": 7}, "tokenizer.ggml.tokens is int 7, not an array of strings"),
    ({"tokenizer.ggml.token_type": [1, 2]}, "token_type is not an array of 260 integers"),
    ({"tokenizer.ggml.model": ["gpt2"]}, "tokenizer.ggml.model is an array of 1 strings, not a string"),
])
def test_damaged_tokenizer_metadata_is_named(tmp_path, changes, fragment):
    tiny_tokenizer_file(tmp_path / "tok.gguf", **changes)
    with pytest.raises(GGUFError) as info:
        build_tokenizer(GGUFFile(tmp_path / "tok.gguf"))
    assert "tok.gguf" in str(info.value) and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("key, fragment", [("tokenizer.ggml.tokens", "tokenizer.ggml.tokens is empty"),
                                           ("tokenizer.ggml.merges", "260 tokens but tokenizer.ggml.merges is empty")])
def test_empty_vocabulary_or_merges_are_named(tmp_path, key, fragment):
    """Found by fuzzing: either would build a tokenizer that encodes every prompt to nothing or to bytes."""
    tiny_tokenizer_file(tmp_path / "tok.gguf")
    f = GGUFFile(tmp_path / "tok.gguf")
    empty = np.empty(0, dtype=np.int64)
    f.metadata[key] = StringArray(f._buf, empty, empty)  # as the reader reads an array of 0 strings
    if key == "tokenizer.ggml.tokens":
        del f.metadata["tokenizer.ggml.token_type"]
    with pytest.raises(GGUFError) as info:
        build_tokenizer(f)
    assert "tok.gguf" in str(info.value) and fragment in str(info.value), str(info.value)


def test_a_token_written_twice_is_named(tmp_path):
    tokens = tiny_tokenizer_file(tmp_path / "tok.gguf")
    tiny_tokenizer_file(tmp_path / "twice.gguf", **{"tokenizer.ggml.tokens": [*tokens[:-1], "<|im_start|>"]})
    with pytest.raises(GGUFError) as info:
        build_tokenizer(GGUFFile(tmp_path / "twice.gguf"))
    assert f"tokens {len(tokens) - 2} and {len(tokens) - 1} are both '<|im_start|>'" in str(info.value)


def test_many_added_tokens_build_at_once(tmp_path):
    """A damaged token_type array can mark every token a control token: built one by one, 20k of them
    took minutes (the library rebuilds its matcher per call); the ids are those of the tokens."""
    meta = byte_level_tokenizer(["he", "Ġhe"], [(f"<|extra_{i}|>", 3 + i % 2) for i in range(20000)])
    write_gguf(tmp_path / "many.gguf", {"token_embd.weight": np.zeros((8, 32), np.float32)},
               lambda n, s: T.F32, arch="qwen2", metadata=meta)
    start = time.monotonic()
    tok = build_tokenizer(GGUFFile(tmp_path / "many.gguf"))
    assert time.monotonic() - start < 20
    tokens = meta["tokenizer.ggml.tokens"]
    ids = tok.encode("he<|extra_7|>he<|extra_19998|>").ids
    assert ids == [tokens.index("he"), tokens.index("<|extra_7|>"), tokens.index("he"), tokens.index("<|extra_19998|>")]
    assert tok.decode(ids, skip_special_tokens=True) == "he<|extra_7|>he"


@pytest.mark.parametrize("metadata, drop, fragments", [
    ({"qwen2vl.attention.head_count": 0}, (), ("head_count is 0", "not a positive integer")),
    ({"qwen2vl.attention.head_count": 2 ** 31}, (), ("attention heads",)),
    ({"qwen2vl.attention.layer_norm_rms_epsilon": "1e-6"}, (), ("layer_norm_rms_epsilon is '1e-6'",)),
    # Found by fuzzing: a damaged head count (heads of 16, not 64) or sections no longer cover the head.
    ({"qwen2vl.attention.head_count": 16}, (), ("dimension_sections", "8 rotary pairs of its 16-wide")),
    ({"qwen2vl.rope.dimension_sections": [8, 12, 13, 0]}, (), ("dimension_sections", "32 rotary pairs")),
    ({"qwen2vl.rope.dimension_sections": "8,12,12"}, (), ("dimension_sections is '8,12,12'",)),
    # Found by fuzzing: values that would run, into silently wrong conditioning.
    ({"qwen2vl.attention.layer_norm_rms_epsilon": 1e30}, (), ("layer_norm_rms_epsilon is 1.0", "beyond any model's (at most 0.01)")),
    ({"qwen2vl.rope.freq_base": 1.8e19}, (), ("freq_base is 1.8", "at most 1e+10")),
    ({}, ("blk.1.attn_v.weight",), ("missing model.layers.1.self_attn.v_proj.weight",)),
    # A file without its last block's tensors would load as a shallower model (llama.cpp refuses it).
    ({"qwen2vl.block_count": QWEN25VL["layers"] + 1}, (),
     (f"header says {QWEN25VL['layers'] + 1} layers (qwen2vl.block_count) but it holds the tensors of "
      f"{QWEN25VL['layers']}", "incomplete")),
    ({"qwen2vl.block_count": 0}, (), ("block_count is 0",)),
    ({}, ("blk.0.attn_k.weight",), ("missing tensor for 'model.layers.0.self_attn.k_proj.weight'",)),
])
def test_damaged_language_model_named_before_anything_is_built(tmp_path, metadata, drop, fragments):
    path = tmp_path / "broken-Q4_K_M.gguf"
    write_llm(path, "qwen2vl", dict(QWEN25VL, vocab=SMALL_VOCAB), None, None, metadata=metadata, drop=drop)
    with pytest.raises(GGUFError) as info:
        open_text_encoder(str(path))
    assert path.name in str(info.value), str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
