"""ComfyUI operations for models whose Linear weights are GGUF-quantized.

The model's layers come from ComfyUI's own ``comfy/ldm`` classes; only the Linear op differs. Its
weight stays quantized bytes wherever ComfyUI puts it: ComfyUI's cast machinery
(offload streams, pinned memory, and the dynamic VRAM loader's page cache) moves the bytes as
uint8, and the layer dequantizes them to the input's dtype on the input's device when it runs. LoRA
patches then apply to the dequantized weight (plain LoRAs in low-rank form, see lora.py). Everything that is
not quantized (norms, the small F32 tensors of every GGUF) goes through ComfyUI's manual-cast path.
"""

from __future__ import annotations

import torch

import comfy.ops

from ..loaders import fp8
from ..loaders.linear import quantized_linear
from ..loaders.tensor import GGMLTensor, dequantize_bytes
from .lora import apply_patches


_PATCH_ATTRS = ("weight_function", "weight_lowvram_function")
# Layers that read the same input one after another, by name under one parent module (Qwen-Image's
# attention projections of each stream, Z-Image's gated MLP): in fp8 mode they share its quantization.
SHARED_INPUT_GROUPS = [("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"), ("w1", "w3")]
# Where the fp8 operands of a layer's resident bytes are kept (see GGUFOps.Linear._fp8_weight).
_KEPT_FP8 = "_qwen_gguf_fp8_weight"


class FileWeights:
    """Weights taken from the loader's state dict as they are (quantized or float, no copy).

    A quantized weight is held as a plain uint8 parameter of its block bytes, its quant type and
    logical shape kept on the module: ComfyUI moves, accounts and pages the bytes like any tensor,
    and torch.compile can trace the layer (it cannot take a tensor subclass parameter)."""
    # The model's compute dtype, set by the loader: bf16, or fp32 where bf16 is unsupported.
    compute_dtype = torch.bfloat16
    expects_bias = False
    weight_qtype = None
    weight_qshape = None
    # In fp8 mode, the activation quantization this layer shares (see share_inputs), and whether it
    # is its group's last member (which lets go of it).
    shared_input = None
    shared_last = False
    # ComfyUI sets these per layer when it patches one; read as attributes on every forward.
    weight_lowvram_function = None
    bias_lowvram_function = None

    def reset_parameters(self):
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("weight", "bias"):
            key = prefix + name
            if key in state_dict:
                tensor = state_dict[key]
                if name == "weight":
                    self.weight_qtype, self.weight_qshape = ((tensor.qtype, tensor.qshape)
                                                             if isinstance(tensor, GGMLTensor) else (None, None))
                with torch._C.DisableTorchFunctionSubclass():
                    tensor = tensor.as_subclass(torch.Tensor)
                setattr(self, name, torch.nn.Parameter(tensor, requires_grad=False))
                # ComfyUI's loaders stage each weight in this dtype: the file's own (uint8 bytes for a
                # quantized weight) so nothing is cast on the way to the device.
                setattr(self, f"{name}_comfy_model_dtype", tensor.dtype)
            elif name == "weight" or self.expects_bias:
                missing_keys.append(key)

    def quantized(self) -> bool:
        """Whether the weight is (still) GGUF block bytes, not a float weight such as a merged LoRA."""
        return self.weight_qtype is not None and self.weight.dtype == torch.uint8

    def convert_weight(self, weight, inplace=False, **kwargs):
        """The float weight for ComfyUI's patching, which casts the stored weight to a float dtype
        first: block bytes (0-255) stay exact in any float dtype, so they are read back from it."""
        if self.quantized() and weight.shape == self.weight.shape:
            return dequantize_bytes(weight.to(torch.uint8), self.weight_qtype, self.weight_qshape, torch.float32)
        return weight

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        """Keep a LoRA-merged weight in the compute dtype, computed once when ComfyUI patches the
        model (the quantized original stays in ComfyUI's backup and comes back on unpatch)."""
        merged = weight.to(self.compute_dtype if self.quantized() else self.weight.dtype)
        if return_weight:
            return merged
        self.weight = torch.nn.Parameter(merged, requires_grad=False)
        self.weight_comfy_model_dtype = merged.dtype


def quantized_layers(model: torch.nn.Module) -> int:
    """How many layers hold GGUF block bytes (for tests and logs)."""
    return sum(isinstance(m, FileWeights) and m.quantized() for m in model.modules())


def share_inputs(model: torch.nn.Module) -> int:
    """Let each SHARED_INPUT_GROUPS group of FP8-rows layers share one activation quantization; returns
    how many groups do."""
    groups = 0
    for parent in model.modules():
        for names in SHARED_INPUT_GROUPS:
            layers = [getattr(parent, name, None) for name in names]
            if all(isinstance(m, FileWeights) and m.weight_qtype is fp8.FP8_ROWS for m in layers):
                shared = fp8.SharedInput()
                for layer in layers:
                    layer.shared_input = shared
                layers[-1].shared_last = True
                groups += 1
    return groups


def drop_kept_weights(model: torch.nn.Module) -> None:
    """Forget the fp8 operands kept for the layers' resident bytes (when ComfyUI unloads the model)."""
    for module in model.modules():
        module.__dict__.pop(_KEPT_FP8, None)


class GGUFOps(comfy.ops.manual_cast):
    class Linear(FileWeights, comfy.ops.manual_cast.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            # The weights come from the file as they are: allocating float ones first would reserve
            # the memory of the full-precision model.
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.weight, self.bias = None, None
            self.expects_bias = bias

        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            # Runs per layer per step, in sampling that can wait on the host: attributes are read once.
            weight = self.weight
            if self.weight_qtype is None or weight.dtype != torch.uint8:
                self._release_shared()  # a LoRA merged into this weight (full load)
                return super().forward_comfy_cast_weights(input, *args, **kwargs)
            patches, lowvram_patch = self.weight_function, self.weight_lowvram_function
            patched = bool(patches) or lowvram_patch is not None
            bias = self.bias
            if (not patched and weight.device == input.device and self._bias_resident(bias, input)
                    and not hasattr(self, "_v")):
                # Fully loaded, unpatched (ComfyUI's dynamic VRAM loader marks the layers it manages
                # with _v): nothing for ComfyUI's cast path to move or patch. Skipping it saves host
                # time per layer and keeps the layer traceable by torch.compile.
                return self._linear(input, weight, bias if bias is None or bias.dtype == input.dtype else bias.to(input.dtype))
            raw, bias, offload = self._cast(input, hide_patches=patched)
            try:
                if not patched:
                    return self._linear(input, raw.contiguous(), bias)
                self._release_shared()
                patches = ([lowvram_patch] if lowvram_patch is not None else []) + list(patches)
                weight = apply_patches(dequantize_bytes(raw, self.weight_qtype, self.weight_qshape, input.dtype), patches)
                return torch.nn.functional.linear(input, weight, bias)
            finally:
                comfy.ops.uncast_bias_weight(self, raw, bias, offload)

        def _linear(self, input, raw, bias):
            if self.weight_qtype is not fp8.FP8_ROWS:
                return quantized_linear(input, raw, self.weight_qtype, self.weight_qshape, bias)
            shared = None if torch.compiler.is_compiling() else self.shared_input
            return fp8.fp8_linear(input, self._fp8_weight(raw), bias, shared, self.shared_last)

        def _release_shared(self):
            """On the paths that take no fp8 matmul: the group's last member still lets go."""
            shared = self.shared_input
            if shared is not None and self.shared_last and not torch.compiler.is_compiling():
                shared.release()

        def _fp8_weight(self, raw) -> fp8.FP8Weight:
            """The fp8 operands (views) of the bytes ``raw``. Those of the dynamic VRAM loader's
            resident copy are kept: it hands back the same tensor while the bytes stay in place, and
            a new one when it brings them in again."""
            state = self.__dict__
            kept = state.get(_KEPT_FP8)
            if kept is not None and kept[0] is raw:
                return kept[1]
            weight = fp8.operands(raw, self.weight_qshape)
            if raw is state.get("_v_weight"):
                state[_KEPT_FP8] = (raw, weight)
            return weight

        def _cast(self, input, hide_patches: bool):
            """ComfyUI's cast of the weight bytes (and the bias) to the input's device."""
            if not hide_patches:
                return comfy.ops.cast_bias_weight(self, input, dtype=torch.uint8, bias_dtype=input.dtype, offloadable=True)
            # ComfyUI's patch functions expect float weights: keep them away from the byte transfer.
            # (Set in the instance dict directly: nn.Module.__setattr__ costs microseconds per layer.)
            state = self.__dict__
            saved = {k: state[k] for k in _PATCH_ATTRS if k in state}
            state.update(weight_function=[], weight_lowvram_function=None)
            try:
                return comfy.ops.cast_bias_weight(self, input, dtype=torch.uint8, bias_dtype=input.dtype, offloadable=True)
            finally:
                for k in _PATCH_ATTRS:
                    state.pop(k, None)
                state.update(saved)

        def _bias_resident(self, bias, input) -> bool:
            return bias is None or (bias.device == input.device and not self.bias_function
                                    and self.bias_lowvram_function is None)

    class Embedding(FileWeights, comfy.ops.manual_cast.Embedding):
        def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                     scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False, device=None, dtype=None):
            torch.nn.Module.__init__(self)
            self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
            self.padding_idx, self.max_norm, self.norm_type = padding_idx, max_norm, norm_type
            self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
            self.weight, self.bias = None, None

        def forward_comfy_cast_weights(self, input, out_dtype=None):
            if not self.quantized():
                return super().forward_comfy_cast_weights(input, out_dtype=out_dtype)
            # Rows are whole quant blocks: gather the tokens' rows where the table lives and
            # dequantize just those, instead of a float copy of the whole table.
            ids = input.reshape(-1).to(self.weight.device)
            values = dequantize_bytes(self.weight[ids], self.weight_qtype, (ids.numel(), self.embedding_dim),
                                      out_dtype or self.compute_dtype)
            return values.to(input.device).reshape(*input.shape, self.embedding_dim)

