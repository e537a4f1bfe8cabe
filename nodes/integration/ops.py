"""ComfyUI operations for models whose Linear weights are GGUF-quantized.

The model's layers come from ComfyUI's own ``comfy/ldm`` classes; only the Linear op differs. Its
weight stays quantized bytes wherever ComfyUI puts it: ComfyUI's cast machinery (offload streams,
pinned memory, and the dynamic VRAM loader's page cache) moves the bytes as uint8, and the layer
runs its execution plan (``loaders.quant.plan``, bound when the weight is loaded) on them. LoRA
patches apply to the dequantized weight (plain LoRAs in low-rank form, see lora.py). Everything
that is not quantized (norms, the small F32 tensors of every GGUF) goes through ComfyUI's
manual-cast path. ComfyUI's internals are reached through ``compat``.
"""

from __future__ import annotations

import functools
import logging

import torch

import comfy.ops

from ...loaders.quant.fp8 import SharedInput
from ...loaders.quant.plan import DeviceCopies, FP8Plan, LinearPlan, bind
from ...loaders.quant.weight import GGMLTensor, dequantize_bytes, wrap
from . import compat
from .lora import apply_patches

log = logging.getLogger(__name__)

# Layers that read the same input one after another, by name under one parent module (Qwen-Image's
# attention projections of each stream, Z-Image's gated MLP): in fp8 mode they share its quantization.
SHARED_INPUT_GROUPS = [("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"), ("w1", "w3")]


class FileWeights:
    """Weights taken from the loader's state dict as they are (quantized or float, no copy).

    A quantized weight is held as a plain uint8 parameter of its bytes, and its plan (format, logical
    shape, how it runs) on the module: ComfyUI moves, accounts and pages the bytes like any tensor,
    and torch.compile can trace the layer (it cannot take a tensor subclass parameter)."""
    # Set per model by ``file_ops``: the dtype it computes in (bf16, or fp32 where bf16 is
    # unsupported) and the device its plans are bound for.
    compute_dtype = torch.bfloat16
    load_device = torch.device("cpu")
    # Set per model by ``file_ops``: the Linear layers decode to FP8 rows per call (fp8 on the fly).
    fp8_rows = False
    expects_bias = False
    plan: LinearPlan | None = None
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
                    self.plan = (bind(tensor.fmt, tensor.qshape, self.load_device, fp8=self.fp8_rows)
                                 if isinstance(tensor, GGMLTensor) else None)
                with torch._C.DisableTorchFunctionSubclass():
                    tensor = tensor.as_subclass(torch.Tensor)
                if (name == "bias" and self.plan is not None and tensor.is_floating_point()
                        and tensor.dtype != self.compute_dtype):
                    # The bias of a quantized layer (F32 in GGUF files) is held in the dtype the layer
                    # computes in, as ComfyUI's own model holds it: cast once here, not per call.
                    tensor = tensor.to(self.compute_dtype)
                setattr(self, name, torch.nn.Parameter(tensor, requires_grad=False))
                # ComfyUI's loaders stage each weight in this dtype: the file's own (uint8 bytes for a
                # quantized weight) so nothing is cast on the way to the device.
                setattr(self, f"{name}_comfy_model_dtype", tensor.dtype)
            elif name == "weight" or self.expects_bias:
                missing_keys.append(key)

    def stored(self) -> torch.Tensor | None:
        """The layer's weight as held (see Embedding: a token table may be held apart from ``weight``)."""
        return self.weight

    def quantized(self) -> bool:
        """Whether the weight is (still) quantized bytes, not a float weight such as a merged LoRA."""
        return self.plan is not None and self.stored().dtype == torch.uint8

    def quantized_weight(self) -> GGMLTensor:
        """The weight's bytes as a quantized tensor that knows its format (for checks and tests)."""
        return wrap(self.stored().detach(), self.plan.fmt, self.plan.shape)

    def convert_weight(self, weight, inplace=False, **kwargs):
        """The float weight for ComfyUI's patching, which casts the stored weight to a float dtype
        first: block bytes (0-255) stay exact in any float dtype, so they are read back from it."""
        if self.quantized() and weight.shape == self.weight.shape:
            return self.plan.weight(weight.to(torch.uint8), torch.float32)
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
    """How many layers hold quantized bytes (for tests and logs)."""
    return sum(isinstance(m, FileWeights) and m.quantized() for m in model.modules())


def share_inputs(model: torch.nn.Module) -> int:
    """Let each SHARED_INPUT_GROUPS group of FP8-rows layers share one activation quantization; returns
    how many groups do."""
    groups = 0
    for parent in model.modules():
        for names in SHARED_INPUT_GROUPS:
            layers = [getattr(parent, name, None) for name in names]
            if all(isinstance(m, FileWeights) and m.plan is not None and m.plan.quantizes_input for m in layers):
                shared = SharedInput()
                for i, layer in enumerate(layers):
                    layer.plan.share(shared, last=i == len(layers) - 1)
                groups += 1
    return groups


def _plans(model: torch.nn.Module):
    return (m.plan for m in model.modules() if isinstance(m, FileWeights) and m.plan is not None)


def attach_copies(model: torch.nn.Module, copies: DeviceCopies) -> None:
    """Let the layers that hold quantized bytes keep converted copies in ``copies`` (cached and fp8
    modes); ComfyUI frees them through the model's patcher (see compat.patcher_class)."""
    for plan in _plans(model):
        if not isinstance(plan, FP8Plan):
            plan.copies = copies
    setattr(model, compat.COPIES, copies)
    setattr(model, compat.RELEASE, functools.partial(release_memory, model))


def copy_resident_layers(model: torch.nn.Module) -> int:
    """Make the converted copies of the layers whose bytes ComfyUI has put on their device, now (after
    its classic loader's load: a model compiled by torch.compile runs no eager call that would make
    them); returns how many were made."""
    made = 0
    for m in model.modules():
        plan = getattr(m, "plan", None) if isinstance(m, FileWeights) else None
        if (plan is None or plan.copies is None or plan.copy is not None or not m.quantized()
                or compat.managed(m) or m.weight.device.type != plan.copies.device_type
                or (m.bias is not None and m.bias.device != m.weight.device)
                or m.weight_function or m.weight_lowvram_function is not None):
            continue
        made += plan.make_copy(m.weight, m.bias) is not None
    return made


def release_memory(model: torch.nn.Module, copies_too: bool) -> int:
    """What the layers hold that ComfyUI does not see, let go when it asks the model for memory: kept
    fp8 operands always (they may view bytes it just moved), the converted copies if ``copies_too``;
    returns the bytes of copies freed."""
    for plan in _plans(model):
        if isinstance(plan, FP8Plan):
            plan.forget_kept()
    return _drop_copies(model, "ComfyUI asked the model for memory") if copies_too else 0


def drop_device_state(model: torch.nn.Module) -> None:
    """Forget what the layers' plans hold for the loaded model (converted copies, LoRA factors, kept
    fp8 operands): when ComfyUI unloads it."""
    _drop_copies(model, "ComfyUI unloaded the model")
    for plan in _plans(model):
        plan.drop_device_state()


def _drop_copies(model: torch.nn.Module, why: str) -> int:
    """Free the model's converted copies, saying so where there were any: the steps after run slower
    until they are made again, and a user timing images should be able to see why."""
    copies = getattr(model, compat.COPIES, None)
    if copies is None:
        return 0
    layers = len(copies.holders)
    freed = copies.drop()
    if layers:
        log.info("GGUF: converted copies of %d layers (%.2f GiB) freed: %s; they are made again at their next use",
                 layers, freed / 2**30, why)
    return freed


def cached_factor_count(model: torch.nn.Module) -> int:
    """How many layers hold LoRA factors (for tests and logs)."""
    return sum(bool(plan.factors) for plan in _plans(model))


def tied_logits(embedding: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` times the token table of ``embedding`` (one of ours) transposed: a language model's output
    where its head is tied to its token embeddings."""
    weight = embedding.stored().to(x.device)
    if isinstance(embedding, FileWeights) and embedding.quantized():
        # The table's plan runs it as a Linear layer would: for the one row of a generated token, the
        # fused kernel reads the quantized blocks instead of dequantizing the whole table.
        return embedding.plan.run(x, weight, None)
    return torch.nn.functional.linear(x, weight.to(x.dtype))


def file_ops(load_device: torch.device, compute_dtype: torch.dtype, fp8_rows: bool = False,
             table_on_host: bool = False) -> type:
    """The operations class for one model: GGUFOps with its layers' plans bound for ``load_device``
    (its Linear layers' for fp8 on the fly where ``fp8_rows``; its quantized token tables kept on the
    CPU where ``table_on_host``)."""
    class Ops(GGUFOps):
        class Linear(GGUFOps.Linear):
            pass

        class Embedding(GGUFOps.Embedding):
            pass
    for cls in (Ops.Linear, Ops.Embedding):
        cls.load_device, cls.compute_dtype = torch.device(load_device), compute_dtype
    Ops.Linear.fp8_rows = fp8_rows
    Ops.Embedding.on_host = table_on_host
    return Ops


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
            plan, weight = self.plan, self.weight
            if plan is None or weight.dtype != torch.uint8:
                if plan is not None:
                    plan.release()  # a LoRA merged into this weight (full load)
                return super().forward_comfy_cast_weights(input, *args, **kwargs)
            patches, lowvram_patch = self.weight_function, self.weight_lowvram_function
            patched = bool(patches) or lowvram_patch is not None
            copy, bias = plan.copy, self.bias
            if (copy is not None and not patched and input.dtype == copy.dtype and input.device == copy.device
                    and not self.bias_function and self.bias_lowvram_function is None
                    and (compat.managed(self) or copy.made_from(bias))):
                # The weight held converted on the device (cached and fp8 modes). ComfyUI's classic
                # loader merges a bias patch into the layer's own bias, in place or not: a copy made
                # from another bias is not used (the dynamic loader patches per call instead).
                return copy(input)
            if (not patched and weight.device == input.device and self._bias_resident(bias, input)
                    and not compat.managed(self)):
                # Fully loaded, unpatched, not paged by the dynamic loader: nothing for ComfyUI's
                # cast path to move or patch. Skipping it saves host time per layer and keeps the
                # layer traceable by torch.compile.
                return plan(input, weight, bias if bias is None or bias.dtype == input.dtype else bias.to(input.dtype),
                            resident=True)
            if not patched:
                with compat.cast_bytes(self, input) as (raw, bias):
                    return plan(input, raw.contiguous(), bias, resident=compat.resident(self, raw))
            plan.release()
            with compat.hidden_patches(self):
                cast = compat.cast_bytes(self, input)
            with cast as (raw, bias):
                patches = ([lowvram_patch] if lowvram_patch is not None else []) + list(patches)
                weight = apply_patches(plan.weight(raw, input.dtype), patches, plan.factors)
                return torch.nn.functional.linear(input, weight, bias)

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

        # Set per model by ``file_ops``: a quantized table stays where the file's tensors are. A language
        # model with its own output head reads only a prompt's rows of it, which the CPU gathers and
        # dequantizes in microseconds. It is held as ``table``, ``weight`` left None: ComfyUI's loaders
        # move every module's ``weight`` to the GPU, the dynamic one as a float weight for a module of
        # no parameter bytes (through convert_weight / set_weight).
        on_host = False
        table: torch.Tensor | None = None

        def _load_from_state_dict(self, *args) -> None:
            super()._load_from_state_dict(*args)
            if self.on_host and self.quantized():
                self.table = self._parameters.pop("weight").data
                self.weight = None

        def stored(self) -> torch.Tensor | None:
            return self.weight if self.table is None else self.table

        def forward_comfy_cast_weights(self, input, out_dtype=None):
            if not self.quantized():
                return super().forward_comfy_cast_weights(input, out_dtype=out_dtype)
            # Rows are whole quant blocks: gather the tokens' rows where the table lives and
            # dequantize just those, instead of a float copy of the whole table.
            table = self.stored()
            ids = input.reshape(-1).to(table.device)
            values = dequantize_bytes(table[ids], self.plan.fmt, (ids.numel(), self.embedding_dim),
                                      out_dtype or self.compute_dtype)
            return values.to(input.device).reshape(*input.shape, self.embedding_dim)
