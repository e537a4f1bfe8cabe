"""The text-encoder loader in real ComfyUI: conditioning matches ComfyUI's own encoder on the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from comfy_env import PACKAGE_NAME, REPO, requires_comfyui, run_prompts, run_script
from comfy_graphs import encode_graph, gguf_clip, native_clip
from loaders.models.text_encoder import open_text_encoder

pytestmark = requires_comfyui


@pytest.fixture(scope="module")
def conds(te_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("clip_run")
    qwen = gguf_clip("Qwen2.5-VL-tiny-Q4_K_M.gguf", "mmproj-F16.gguf")
    qwen_native = native_clip(te_models, "Qwen2.5-VL-tiny-Q4_K_M.gguf", "qwen25vl-tiny.safetensors", "qwen25vl",
                              "mmproj-F16.gguf")
    z = gguf_clip("Qwen3-tiny-Q4_K_M.gguf")
    z_native = native_clip(te_models, "Qwen3-tiny-Q4_K_M.gguf", "qwen3-tiny.safetensors", "qwen3")
    cases = {
        "text": (qwen, 0), "text_native": (qwen_native, 0),
        "edit1": (qwen, 1), "edit1_native": (qwen_native, 1),
        "edit2": (qwen, 2), "edit2_native": (qwen_native, 2),
        "bundled_tokenizer": (gguf_clip("Qwen2.5-VL-tiny-notok.gguf"), 0),
        "zimage": (z, 0), "zimage_native": (z_native, 0),
    }
    prompts = [encode_graph(loader, str(work / f"{name}.st"), images) for name, (loader, images) in cases.items()]
    prompts.append(encode_graph(gguf_clip("Qwen2.5-VL-tiny-Q4_K_M.gguf"), str(work / "never.st"), images=1))
    prompts.append(encode_graph(gguf_clip("Qwen2.5-VL-tiny-Q4_K_M.gguf", "Qwen3-tiny-Q4_K_M.gguf"),
                                str(work / "never.st")))
    results = run_prompts(work, te_models, prompts)
    out = {}
    for name, result in zip(cases, results):
        assert result["success"], f"{name}: {result['error'] and (result['error'].get('exception_type'), result['error'].get('exception_message'), result['error'].get('traceback', [])[-3:])}"
        out[name] = load_file(str(work / f"{name}.st"))["cond"]
    out["no_mmproj"], out["swapped"] = results[-2], results[-1]
    return out


def assert_close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    rel = ((a - b).norm() / b.norm()).item()
    assert torch.isfinite(a).all() and rel < 1e-4, rel


@pytest.mark.parametrize("case", ["text", "edit1", "edit2", "zimage"])
def test_conditioning_matches_native(conds, case):
    assert_close(conds[case], conds[f"{case}_native"])


def test_images_change_the_conditioning(conds):
    assert conds["edit1"].shape[1] > conds["text"].shape[1]
    assert conds["edit2"].shape[1] > conds["edit1"].shape[1]


def test_without_tokenizer_uses_bundled_one(conds):
    # Same weights but another file: the bundled tokenizer gives the same ids, so the same conditioning.
    assert conds["bundled_tokenizer"].shape == conds["text"].shape


def test_edit_without_mmproj_says_what_is_needed(conds):
    r = conds["no_mmproj"]
    assert not r["success"]
    message = r["error"]["exception_message"]
    assert "mmproj" in message and "Qwen2.5-VL-tiny-Q4_K_M.gguf" in message


def test_wrong_file_as_mmproj(conds):
    message = conds["swapped"]["error"]["exception_message"]
    assert "Qwen3-tiny-Q4_K_M.gguf" in message and "not an mmproj" in message


def test_gguf_tokenizer_ids_equal_comfyuis_for_every_family(te_models, tmp_path):
    # Qwen-Image (text and the edit template with images) and Z-Image, against ComfyUI's own tokenizers.
    te = te_models / "text_encoders"
    r = run_script(tmp_path, te_models, REPO / "tests" / "comfy_scripts" / "tokenizer_ids.py", package=PACKAGE_NAME,
                   ggufs={"qwen25vl": str(te / "Qwen2.5-VL-tiny-Q4_K_M.gguf"),
                          "qwen3": str(te / "Qwen3-tiny-Q4_K_M.gguf")},
                   corpora=[str(REPO / "tests" / "data" / "tokenizer_corpus.txt"),
                            str(REPO / "tests" / "data" / "prompts.txt")])
    assert r["texts"] > 30 and r["tokens"] > 10000 and r["mismatches"] == [], r


CHAT = ("<|im_start|>system\nRewrite the user's idea as a detailed image prompt.<|im_end|>\n"
        "<|im_start|>user\na fox in the snow<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("gguf", ["Qwen2.5-VL-tiny-head.gguf", "Qwen3-tiny-Q4_K_M.gguf"])
def test_greedy_generation_matches_transformers(te_models, tmp_path, gguf):
    # ComfyUI's generation path (what its TextGenerate node runs) on our CLIP against Hugging Face's
    # model of the same dequantized weights: the same tokens, greedy. Qwen2.5-VL's file has its own
    # output head; Qwen3-4B's ties it to the token table.
    import transformers
    r = run_script(tmp_path, te_models, REPO / "tests" / "comfy_scripts" / "te_generate.py", package=PACKAGE_NAME,
                   gguf=str(te_models / "text_encoders" / gguf), prompt=CHAT, max_length=12)
    assert r["prompt_ids"][0] == 151644, "the chat text is taken as it is (no template around it)"
    assert r["stop_tokens"] == [151643, 151645]
    # A model with its own output head keeps its quantized token table on the CPU when it is moved
    # (it only serves lookups); a tied one moves it with the layers (it is the output head too).
    assert r["layer_after_move"] == "meta"
    assert (r["table_parameter"], r["loaders_see_table"], r["table_after_move"]) == \
        ((True, True, "meta") if "Qwen3" in gguf else (False, False, "cpu"))
    te = open_text_encoder(str(te_models / "text_encoders" / gguf))
    c = te.config
    qwen3 = te.family == "qwen3"
    config_class = transformers.Qwen3Config if qwen3 else transformers.Qwen2Config
    config = config_class(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                          intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                          num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
                          head_dim=c["head_dim"], rope_theta=c["rope_theta"], rms_norm_eps=c["rms_norm_eps"],
                          tie_word_embeddings=not c["lm_head"], attn_implementation="eager")
    causal = (transformers.Qwen3ForCausalLM if qwen3 else transformers.Qwen2ForCausalLM)(config).eval()
    twin = load_file(str(te_models / "text_encoders" /
                         ("qwen3-tiny.safetensors" if qwen3 else "qwen25vl-head.safetensors")))
    missing, unexpected = causal.load_state_dict(twin, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (qwen3 or not missing), (missing, unexpected)
    with torch.no_grad():
        out = causal.generate(torch.tensor([r["prompt_ids"]]), max_new_tokens=12, do_sample=False,
                              eos_token_id=r["stop_tokens"], pad_token_id=151643)
    expected = out[0, len(r["prompt_ids"]):].tolist()
    assert len(expected) > 1 and r["generated"] == expected, (r["generated"], expected)
