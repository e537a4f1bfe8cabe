"""Runs inside a started ComfyUI: token ids from the GGUF's own tokenizer against ComfyUI's bundled
Qwen tokenizer, on a corpus, both raw and through the CLIP's full tokenize (templates included)."""

import os
from pathlib import Path

from transformers import Qwen2Tokenizer

import comfy.text_encoders.qwen_image
from script_helpers import loaded_module


def run(cfg):
    pkg = loaded_module(cfg, cfg["package"])
    gguf = pkg.loaders.gguf_file.GGUFFile(cfg["gguf"])
    ours = pkg.loaders.tokenizer.build_tokenizer(gguf)
    bundled = Qwen2Tokenizer.from_pretrained(
        os.path.join(os.path.dirname(comfy.text_encoders.qwen_image.__file__), "qwen25_tokenizer"))
    texts = []
    for corpus in cfg["corpora"]:
        content = Path(corpus).read_text(encoding="utf-8")
        texts.append(content)
        texts.extend(line for line in content.splitlines() if line)
    mismatches = []
    for text in texts:
        a, b = ours.encode(text).ids, bundled(text)["input_ids"]
        if a != b:
            mismatches.append({"text": text[:80], "ours": a[:20], "bundled": b[:20]})
    return {"texts": len(texts), "tokens": sum(len(bundled(t)["input_ids"]) for t in texts), "mismatches": mismatches}
