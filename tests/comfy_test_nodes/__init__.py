"""Test-only nodes, loaded by ComfyUI's custom-node loader beside the package under test.

They supply what the graphs under test need from outside (fixed conditioning, the native
reference model) and capture results (latents) to files the tests read back.
"""

import json

import torch
from safetensors.torch import save_file

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import comfy.utils
import folder_paths

# Model-config keys that ComfyUI's detection takes from markers in the weights (Edit-2511's reference method, ...).
VARIANT_MARKERS = ("default_ref_method", "use_additional_t_cond")
MODEL_CONFIGS = {"qwen_image": comfy.supported_models.QwenImage, "z_image": comfy.supported_models.ZImage}
# UNETLoader's weight_dtype choices that a test uses (None: ComfyUI's own pick for the device).
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn}


class TestConditioning:
    """Random text conditioning of a given width, reproducible from a seed."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 8}),
                             "width": ("INT", {"default": 256})},
                "optional": {"reference": ("INT", {"default": 0})}}
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens, width, reference=0):
        g = torch.Generator().manual_seed(seed)
        extra = {"reference_latents": [torch.randn(1, 16, reference, reference, generator=g)]} if reference else {}
        return ([[torch.randn(1, tokens, width, generator=g), extra]],)


class TestNativeUnetLoader:
    """The reference: a safetensors file loaded through ComfyUI's own model classes and ordinary
    ops, with the sizes passed explicitly (stock detection assumes the full-size widths) and the
    variant markers (Edit-2511's reference method, ...) from ComfyUI's own detection."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),),
                             "family": (list(MODEL_CONFIGS),), "config_json": ("STRING", {"default": "{}"})},
                "optional": {"weight_dtype": (list(WEIGHT_DTYPES), {"default": "default"})}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, unet_name, family, config_json, weight_dtype="default"):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        sizes = json.loads(config_json)
        detected = comfy.model_detection.detect_unet_config(sd, "")
        for marker in VARIANT_MARKERS:
            sizes.pop(marker, None)
            if marker in detected:
                sizes[marker] = detected[marker]
        config = MODEL_CONFIGS[family](sizes)
        load_device = comfy.model_management.get_torch_device()
        supported = [torch.bfloat16, torch.float32]
        dtype = comfy.model_management.unet_dtype(load_device, supported_dtypes=supported)
        cast = None
        if WEIGHT_DTYPES[weight_dtype] is not None:
            # As ComfyUI's UNETLoader does for a chosen weight dtype: weights stored in it, computed in another.
            dtype = WEIGHT_DTYPES[weight_dtype]
            cast = comfy.model_management.unet_manual_cast(dtype, load_device, supported)
        config.set_inference_dtype(dtype, cast)
        config.custom_operations = comfy.ops.manual_cast
        model = config.get_model(sd, "")
        patcher = comfy.model_patcher.CoreModelPatcher(model, load_device, comfy.model_management.unet_offload_device())
        model.load_model_weights(sd, "", assign=patcher.is_dynamic())
        return (patcher,)


class TestCity96UnetLoader:
    """city96's ComfyUI-GGUF UnetLoaderGGUF (where it is installed beside), run as it is, with only
    ComfyUI's model detection given the sizes (as for the reference: it assumes the full-size widths)
    and float32 chosen for decoding."""
    @classmethod
    def INPUT_TYPES(cls):
        # A plain string: city96's node resolves the name in its own folder list ("unet_gguf").
        return {"required": {"unet_name": ("STRING", {"default": ""}), "config_json": ("STRING", {"default": "{}"})}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, unet_name, config_json):
        import nodes
        if "UnetLoaderGGUF" not in nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError("city96's ComfyUI-GGUF is not loaded")
        sizes = json.loads(config_json)
        detect = comfy.model_detection.detect_unet_config

        def with_sizes(state_dict, key_prefix, *args, **kwargs):
            detected = detect(state_dict, key_prefix, *args, **kwargs)
            if detected is None:
                return None
            return {**detected, **{k: v for k, v in sizes.items() if k not in VARIANT_MARKERS}}

        comfy.model_detection.detect_unet_config = with_sizes
        try:
            # Its blocks decoded in float32 (its advanced node's choice): by default it decodes in
            # float16, whose rounding is its own and not the file's.
            return nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]().load_unet(unet_name, dequant_dtype="float32")
        finally:
            comfy.model_detection.detect_unet_config = detect


class TestSaveLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "path": ("STRING", {"default": ""})}}
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "testing"

    def save(self, samples, path):
        save_file({"samples": samples["samples"].contiguous()}, path)
        return {}


NODE_CLASS_MAPPINGS = {"TestConditioning": TestConditioning, "TestNativeUnetLoader": TestNativeUnetLoader,
                       "TestSaveLatent": TestSaveLatent, "TestCity96UnetLoader": TestCity96UnetLoader}


class TestNativeClipLoader:
    """The reference text encoder: a Hugging Face-named safetensors file through ComfyUI's own CLIP,
    text-encoder classes, ordinary ops and bundled tokenizer. Only the sizes are changed, by
    setting the values ComfyUI's classes fix for the full-size models while they are built."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),),
                             "family": (["qwen25vl", "qwen3"],), "config_json": ("STRING", {"default": "{}"}),
                             "vision_json": ("STRING", {"default": ""})}}
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, clip_name, family, config_json, vision_json):
        import dataclasses
        import comfy.sd
        import comfy.text_encoders.llama as llama
        import comfy.text_encoders.qwen_image as qwen_image
        import comfy.text_encoders.qwen_vl as qwen_vl
        import comfy.text_encoders.z_image as z_image
        from comfy.supported_models_base import ClipTarget

        config = json.loads(config_json)
        vision = json.loads(vision_json) if vision_json else None
        name, config_cls, target = {
            "qwen25vl": ("qwen25_7b", llama.Qwen25_7BVLI_Config,
                         ClipTarget(qwen_image.QwenImageTokenizer, qwen_image.QwenImageTEModel)),
            "qwen3": ("qwen3_4b", llama.Qwen3_4BConfig, ClipTarget(z_image.ZImageTokenizer, z_image.ZImageTEModel)),
        }[family]
        fields = {f.name for f in dataclasses.fields(config_cls)}
        # Read again whenever the model runs, so these stay set in this (test-only) process.
        config_cls.head_dim, config_cls.qkv_bias = config["head_dim"], config["qkv_bias"]
        config_cls.rope_dims = config.get("rope_dims", config_cls.rope_dims)
        original_vision = qwen_vl.Qwen2VLVisionTransformer

        class TinyVision(original_vision):
            def __init__(self, hidden_size, output_hidden_size, device=None, dtype=None, ops=None, **kwargs):
                super().__init__(hidden_size=vision["hidden_size"], output_hidden_size=output_hidden_size,
                                 intermediate_size=vision["intermediate_size"], num_heads=vision["num_heads"],
                                 num_layers=vision["num_layers"], device=device, dtype=dtype, ops=ops)
                self.fullatt_block_indexes = vision["fullatt_block_indexes"]

        if vision:
            qwen_vl.Qwen2VLVisionTransformer = TinyVision
        try:
            sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("text_encoders", clip_name))
            options = {f"{name}_model_config": {k: v for k, v in config.items() if k in fields},
                       "dtype": torch.float32}
            clip = comfy.sd.CLIP(target, state_dict=[sd], model_options=options,
                                 parameters=sum(t.numel() for t in sd.values()))
        finally:
            qwen_vl.Qwen2VLVisionTransformer = original_vision
        return (clip,)


class TestImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "width": ("INT", {"default": 64}),
                             "height": ("INT", {"default": 64})}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, width, height):
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(1, height, width, 3, generator=g),)


class TestSaveConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "path": ("STRING", {"default": ""})}}
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "testing"

    def save(self, conditioning, path):
        save_file({"cond": conditioning[0][0].float().contiguous()}, path)
        return {}


NODE_CLASS_MAPPINGS.update({"TestNativeClipLoader": TestNativeClipLoader, "TestImage": TestImage,
                            "TestSaveConditioning": TestSaveConditioning})


class TestLatent:
    """A random 16-channel Qwen-Image style latent (with its time axis)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "width": ("INT", {"default": 16}),
                             "height": ("INT", {"default": 16})}}
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, width, height):
        g = torch.Generator().manual_seed(seed)
        return ({"samples": torch.randn(1, 16, 1, height, width, generator=g)},)


class TestSaveImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "path": ("STRING", {"default": ""})}}
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "testing"

    def save(self, images, path):
        save_file({"images": images.float().contiguous()}, path)
        return {}


class TestForceDtype:
    """Makes a model compute in the given dtype (fp16 reproduces the overflow users hit)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "dtype": (["float16", "bfloat16", "float32"],)}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "force"
    CATEGORY = "testing"

    def force(self, model, dtype):
        model.model.manual_cast_dtype = getattr(torch, dtype)
        return (model,)


NODE_CLASS_MAPPINGS.update({"TestLatent": TestLatent, "TestSaveImage": TestSaveImage,
                            "TestForceDtype": TestForceDtype})
