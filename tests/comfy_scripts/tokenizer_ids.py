"""Runs inside a started ComfyUI: token ids of our CLIPs (the GGUFs' own tokenizers) against ComfyUI's
own tokenizers for the same families, on a corpus, through the full tokenize each text-encode node
runs (templates, "embedding:" words, prompt weights, the edit template with images)."""

from pathlib import Path

import torch

import comfy.text_encoders.qwen_image as qwen_image
import comfy.text_encoders.z_image as z_image
import folder_paths
from script_helpers import loaded_module

NATIVE = {"qwen25vl": qwen_image.QwenImageTokenizer, "qwen3": z_image.ZImageTokenizer}


def flat(tokens: dict) -> list:
    """Token ids and weights of every key, an image embed as a marker of its kind."""
    out = []
    for key, batches in tokens.items():
        for batch in batches:
            for token, weight, *_ in batch:
                out.append((key, token if isinstance(token, int) else ("embed", token.get("type")), weight))
    return out


def run(cfg):
    pkg = loaded_module(cfg, cfg["package"])
    texts = []
    for corpus in cfg["corpora"]:
        content = Path(corpus).read_text(encoding="utf-8")
        texts.append(content)
        texts.extend(line for line in content.splitlines() if line)
    texts.append(" ".join(Path(cfg["corpora"][0]).read_text(encoding="utf-8").split()) * 8)  # a long prompt
    image = torch.rand(1, 64, 64, 3)
    embeddings = folder_paths.get_folder_paths("embeddings")
    report = {"texts": len(texts), "mismatches": [], "tokens": 0}
    for family, gguf in cfg["ggufs"].items():
        ours = pkg.nodes.integration.text_encoder.build_clip(pkg.loaders.models.text_encoder.open_text_encoder(gguf)).tokenizer
        native = NATIVE[family](embedding_directory=embeddings)
        cases = [(text, {}) for text in texts]
        if family == "qwen25vl":  # the edit nodes' path: the image template and its image tokens
            cases += [(text, {"images": [image]}) for text in texts[:6]]
        for text, kwargs in cases:
            a = flat(ours.tokenize_with_weights(text, **kwargs))
            b = flat(native.tokenize_with_weights(text, **kwargs))
            report["tokens"] += len(b)
            if a != b:
                first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                report["mismatches"].append({"family": family, "images": bool(kwargs), "text": text[:80],
                                             "at": first, "ours": a[first:first + 8], "native": b[first:first + 8]})
    return report
