"""Building ComfyUI's CLIP (tokenizer + text encoder) from a GGUF text encoder read by ``loaders``.

ComfyUI's own Qwen text-encoder classes do the encoding (templates, image tokens, the vision
tower), so CLIPTextEncode and the Qwen-Image edit nodes behave as with native files. Three things
are ours: the sizes come from the file (ComfyUI's classes fix the 7B / 4B sizes), the weights stay
quantized (our ops, ``ops``), and the tokenizer is the GGUF's own when it carries one.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import PreTrainedTokenizerFast

import comfy.model_management
import comfy.patcher_extension
import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.llama as llama
import comfy.text_encoders.qwen_image as qwen_image
import comfy.text_encoders.qwen_vl as qwen_vl
import comfy.text_encoders.z_image as z_image
import folder_paths
from comfy.supported_models_base import ClipTarget

from ...loaders.gguf.errors import GGUFError
from ...loaders.gguf.file_kind import CLIP_LOADER
from ...loaders.quant.health import damage_report
from ...loaders.quant.weight import logical_shape
from ...loaders.models.text_encoder import TextEncoder
from .guard import file_weights
from .ops import drop_device_state, file_ops, tied_logits

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Family:
    """How ComfyUI encodes with one language-model family (names and settings of its own classes)."""
    name: str                     # ComfyUI's key for the encoder ("qwen25_7b")
    te: type                      # ComfyUI's text-encoder model class
    tokenizer: type               # ComfyUI's tokenizer wrapper class
    transformer: type             # ComfyUI's transformer class
    config: type                  # its config dataclass
    layer: str
    layer_idx: int | None
    embeddings: bool              # its tokenizer reads "embedding:name" (Z-Image's does, Qwen-Image's not)
    pad_token: int = 151643


ENCODER_FAMILIES = {
    "qwen25vl": Family("qwen25_7b", qwen_image.QwenImageTEModel, qwen_image.QwenImageTokenizer,
                       llama.Qwen25_7BVLI, llama.Qwen25_7BVLI_Config, "last", None, embeddings=False),
    "qwen3": Family("qwen3_4b", z_image.ZImageTEModel, z_image.ZImageTokenizer,
                    llama.Qwen3_4B, llama.Qwen3_4BConfig, "hidden", -2, embeddings=True),
}

# Config values ComfyUI's config classes hold as plain class attributes (not constructor fields).
_CLASS_LEVEL = ("head_dim", "qkv_bias", "rope_dims", "q_norm", "k_norm", "stop_tokens")


def _llm_config(family: Family, te: TextEncoder):
    fields = {f.name for f in dataclasses.fields(family.config)}
    config = family.config(**{k: v for k, v in te.config.items() if k in fields})
    values = dict(te.config, q_norm="gemma3" if te.config["qk_norm"] else None)
    values["k_norm"] = values["q_norm"]
    for key in _CLASS_LEVEL:
        if key in values:
            setattr(config, key, values[key])
    return config


def _transformer_class(family: Family, te: TextEncoder) -> type:
    vision, llm_path = te.vision, te.llm_path

    class GGUFTransformer(family.transformer):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = _llm_config(family, te)
            self.num_layers = config.num_hidden_layers
            # config.lm_head (the file has its own output head): the model holds it as lm_head.
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype
            if vision is not None:
                self.visual = qwen_vl.Qwen2VLVisionTransformer(
                    hidden_size=vision.hidden_size, output_hidden_size=vision.output_hidden_size,
                    intermediate_size=vision.intermediate_size, num_heads=vision.num_heads,
                    num_layers=vision.num_layers, patch_size=vision.patch_size,
                    spatial_merge_size=vision.spatial_merge_size, device=device, dtype=dtype, ops=operations)
                self.visual.fullatt_block_indexes = list(vision.fullatt_block_indexes)

        def logits(self, x):
            # ComfyUI's generation reads the head's weight as floats; ours are quantized bytes, so the
            # head runs as the layer it is: the file's output head, else the token table (tied weights).
            x = x[:, -1:]
            head = getattr(self.model, "lm_head", None)
            if head is not None:
                return head(x)
            return tied_logits(self.model.embed_tokens, x)

        def preprocess_embed(self, embed, device):
            if embed["type"] == "image" and vision is None:
                raise GGUFError(llm_path, "this prompt has images (an edit node), which need the vision tower: "
                                          f"choose the mmproj file in the '{CLIP_LOADER}' node "
                                          "(e.g. mmproj-F16.gguf from the same repository as the language model)")
            out = super().preprocess_embed(embed, device)
            if out[0] is not None:
                _check_finite(self.visual, out[0], "vision tower's", te.mmproj_path)
            return out

    return GGUFTransformer


def _check_finite(module: torch.nn.Module, out: torch.Tensor, what: str, path: str) -> None:
    """Conditioning holding NaN/inf would sample into a black image: name the damaged file instead."""
    if torch.isfinite(out).all():
        return
    damage = damage_report(file_weights(module))
    if damage:
        raise GGUFError(path, f"the {what} output holds NaN/inf because {damage}: it is damaged, download it again")
    raise GGUFError(path, f"the {what} output holds NaN/inf though its weights are finite: its hyperparameters "
                          "(rope, norm epsilon) do not suit its weights")


def _clip_model_class(family: Family, transformer: type, te: TextEncoder) -> type:
    class GGUFClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer=family.layer, layer_idx=family.layer_idx, dtype=None,
                     attention_mask=True, model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                             special_tokens={"pad": family.pad_token}, layer_norm_hidden_state=False,
                             model_class=transformer, enable_attention_masks=attention_mask,
                             return_attention_masks=attention_mask, model_options=model_options)

        def forward(self, tokens):
            out = super().forward(tokens)
            _check_finite(self.transformer.model, out[0], "text encoder's", te.llm_path)
            return out
    return GGUFClipModel


def _tokenizer_class(family: Family, te: TextEncoder) -> type:
    fast = PreTrainedTokenizerFast(tokenizer_object=te.tokenizer)
    hidden = te.config["hidden_size"]

    class FromGGUF:
        @staticmethod
        def from_pretrained(path, **kwargs):
            return fast

    class GGUFTokenizer(comfy.sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(None, pad_with_end=False,
                             embedding_directory=embedding_directory if family.embeddings else None,
                             embedding_size=hidden, embedding_key=family.name, tokenizer_class=FromGGUF,
                             has_start_token=False, has_end_token=False, pad_to_max_length=False,
                             max_length=99999999, min_length=1, pad_token=family.pad_token,
                             tokenizer_data=tokenizer_data)
    return GGUFTokenizer


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device runs it well, else fp32 (Qwen models are trained in bf16; fp16 can overflow)."""
    return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float32


def _check_bundled_vocabulary(clip: comfy.sd.CLIP, family: Family, te: TextEncoder) -> None:
    """A file without a tokenizer is read with ComfyUI's bundled one, whose ids must all have a row in
    the file's token table (otherwise the first prompt fails with an index error)."""
    bundled = getattr(clip.tokenizer, family.name).tokenizer
    top = max(bundled.get_vocab().values())
    rows = logical_shape(te.state_dict["model.embed_tokens.weight"])[0]
    if top >= rows:
        raise GGUFError(te.llm_path, f"its token table has {rows:,} rows and the file carries no tokenizer; "
                                     f"ComfyUI's bundled Qwen tokenizer, used instead, has ids up to {top:,}: the "
                                     "file is not a complete Qwen text encoder")


def _on_detach(patcher, unpatch_all: bool = True, *args) -> None:
    """ComfyUI ON_DETACH callback: the LoRA factors our layers hold for the loaded encoder go with it."""
    if unpatch_all:
        drop_device_state(patcher.model)


def build_clip(te: TextEncoder) -> comfy.sd.CLIP:
    family = ENCODER_FAMILIES[te.family]
    load_device = comfy.model_management.text_encoder_device()
    dtype = compute_dtype(load_device)
    model_options = {
        # Where the file has its own output head the token table serves only lookups: it stays on the CPU.
        "custom_operations": file_ops(load_device, dtype, table_on_host=te.config["lm_head"]),
        "dtype": dtype,
        # Built where the file's tensors are: they go in after the CLIP is built, and ComfyUI's classic
        # loader (no dynamic VRAM) would otherwise put a large encoder on a roomy GPU (with --gpu-only,
        # any encoder) while still empty, count it as loaded, and stream every weight from RAM on
        # every encode.
        "initial_device": torch.device("cpu"),
        f"{family.name}_class": _clip_model_class(family, _transformer_class(family, te), te),
    }
    tokenizer_data = {}
    if te.tokenizer is not None:
        tokenizer_data[f"{family.name}_tokenizer_class"] = _tokenizer_class(family, te)
        log.info("GGUF text encoder %s: using the tokenizer stored in the GGUF", te.llm_path)
    else:
        log.info("GGUF text encoder %s: no tokenizer in the file, using ComfyUI's bundled Qwen tokenizer",
                 te.llm_path)
    params = sum(logical_shape(t).numel() for t in te.state_dict.values())
    clip = comfy.sd.CLIP(ClipTarget(family.tokenizer, family.te), embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         tokenizer_data=tokenizer_data, parameters=params, model_options=model_options)
    if te.tokenizer is None:
        _check_bundled_vocabulary(clip, family, te)
    missing, unexpected = clip.load_sd(dict(te.state_dict))
    missing = [k for k in missing if not k.endswith("logit_scale") and "lm_head" not in k]
    if missing:
        raise GGUFError(te.llm_path if not any(k.startswith("visual.") for k in missing) else te.mmproj_path,
                        f"tensors missing for this model: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    clip.patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, _on_detach)
    vision = "no vision tower" if te.vision is None else f"vision tower from {te.mmproj_path}"
    log.info("GGUF text encoder %s: %s, %d layers, hidden %d, %s; computing in %s; weights %s", te.llm_path,
             te.family, te.config["num_hidden_layers"], te.config["hidden_size"], vision, dtype, te.summary)
    return clip
