"""ComfyUI operations for models whose Linear weights are GGUF-quantized.

The model's layers come from ComfyUI's own ``comfy/ldm`` classes; only the Linear op differs: its
weight stays a ``GGMLTensor`` (quantized bytes) wherever ComfyUI moves it, and is dequantized to
the input's dtype on the input's device when the layer runs, after which LoRA patches in
``weight_function`` apply as they do to any other weight. Everything that is not quantized (norms,
embeddings, the small F32 tensors of every GGUF) goes through ComfyUI's ordinary manual-cast path.
"""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.ops

from ..loaders.tensor import GGMLTensor, dequantize


def _assign(module: torch.nn.Module, state_dict: dict, prefix: str, missing_keys: list) -> None:
    """Take the loader's tensors as they are: copying into preallocated float weights would both
    double the memory and turn quantized bytes into numbers."""
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict:
            setattr(module, name, torch.nn.Parameter(state_dict[key], requires_grad=False))
        elif getattr(module, name, None) is not None:
            missing_keys.append(key)


class GGUFOps(comfy.ops.manual_cast):
    class Linear(comfy.ops.manual_cast.Linear):
        # The model's compute dtype, set by the loader: bf16, or fp32 where bf16 is unsupported.
        compute_dtype = torch.bfloat16

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            _assign(self, state_dict, prefix, missing_keys)

        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            if not isinstance(self.weight, GGMLTensor):
                return super().forward_comfy_cast_weights(input, *args, **kwargs)
            device, dtype = input.device, input.dtype
            non_blocking = comfy.model_management.device_supports_non_blocking(device)
            weight = dequantize(self.weight.to(device, non_blocking=non_blocking), dtype)
            for patch in self.weight_function:
                weight = patch(weight)
            bias = None
            if self.bias is not None:
                bias = self.bias.to(device=device, dtype=dtype, non_blocking=non_blocking)
                for patch in self.bias_function:
                    bias = patch(bias)
            return torch.nn.functional.linear(input, weight, bias)

        def convert_weight(self, weight, inplace=False, **kwargs):
            return dequantize(weight, torch.float32) if isinstance(weight, GGMLTensor) else weight

        def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
            """Keep a LoRA-merged weight in the compute dtype, computed once when ComfyUI patches the
            model (the quantized original stays in ComfyUI's backup and comes back on unpatch)."""
            merged = weight.to(self.compute_dtype if isinstance(self.weight, GGMLTensor) else self.weight.dtype)
            if return_weight:
                return merged
            self.weight = torch.nn.Parameter(merged, requires_grad=False)

