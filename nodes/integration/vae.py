"""A ComfyUI VAE that never hands back a black image.

``GuardedVAE`` is ComfyUI's own VAE with two additions that every node using it gets (VAEDecode,
VAEEncode, TextEncodeQwenImageEdit's reference latents): it tiles by itself when the work would
not fit in free memory, and it redoes a decode or encode in fp32 when the result holds NaN or inf,
failing with a clear error if that does not help either.
"""

from __future__ import annotations

import logging

import torch

import comfy.diffusers_convert
import comfy.ldm.modules.diffusionmodules.model as sd_vae
import comfy.ldm.wan.vae
import comfy.model_management
import comfy.sd

from ...loaders.gguf.errors import GGUFError
from ...loaders.gguf.state_dict import check_tensors
from ...loaders.models.vae import FLUX, LATENT_FORMATS, WAN21, VAEFamily, open_vae

log = logging.getLogger(__name__)

DEFAULT_TILE = 512


def _first_stage_on_meta(family: VAEFamily, sd: dict) -> torch.nn.Module:
    """The model ComfyUI's VAE builds for this family and these sizes (comfy.sd.VAE reads them from
    the same tensors), on the meta device: its tensor names and shapes, no memory."""
    with torch.device("meta"):
        if family is WAN21:
            return comfy.ldm.wan.vae.WanVAE(dim=sd["decoder.head.0.gamma"].shape[0], z_dim=16, dim_mult=[1, 2, 4, 4],
                                            num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True],
                                            image_channels=sd["encoder.conv1.weight"].shape[1],
                                            conv_out_channels=sd["decoder.head.2.weight"].shape[0], dropout=0.0)
        config = dict(double_z=True, z_channels=sd["decoder.conv_in.weight"].shape[1], resolution=256, in_channels=3,
                      out_ch=3, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
        model = torch.nn.Module()
        model.encoder = sd_vae.Encoder(**config)
        model.decoder = sd_vae.Decoder(**dict(config, ch=sd["decoder.conv_in.weight"].shape[0] // 4))
        return model


def check_weights(family: VAEFamily, sd: dict, path: str) -> bool:
    """Every tensor ComfyUI's model of this VAE needs, present and of its shape (one GGUFError listing
    what is not), before ComfyUI builds it. A file without any encoder tensor is a decoder-only VAE:
    it loads and refuses to encode. Returns whether it can encode."""
    expected = {k: tuple(v.shape) for k, v in _first_stage_on_meta(family, sd).state_dict().items()}
    encoder = [k for k in expected if k.startswith("encoder.")]
    decoder_only = family is FLUX and not any(k in sd for k in encoder)
    if decoder_only:
        expected = {k: v for k, v in expected.items() if k not in encoder}
    unexpected = check_tensors(path, sd, expected, f"complete {family.description.removeprefix('the ')}",
                               unexpected_is_fault=False)
    if unexpected:
        log.warning("VAE %s: tensors this VAE does not use, ignored: %s", path, ", ".join(unexpected[:8]))
    return not decoder_only


class GuardedVAE(comfy.sd.VAE):
    family = None
    path = ""
    tile_size = DEFAULT_TILE
    can_encode = True

    def _tile_args(self, tile_size: int) -> dict:
        scale = self.spacial_compression_decode()
        tile = max(8, tile_size // scale)
        return {"tile_x": tile, "tile_y": tile, "overlap": tile // 4}

    def _fits(self, memory: float) -> bool:
        # Loading asks ComfyUI to make room first (it offloads other models); only what still does
        # not fit after that is worth tiling.
        comfy.model_management.load_models_gpu([self.patcher], memory_required=memory,
                                               force_full_load=self.disable_offload)
        return memory <= comfy.model_management.get_free_memory(self.device)

    def _encode_shape(self, pixels: torch.Tensor) -> tuple:
        """The input shape ComfyUI's encode sizes its memory by (video VAEs add a time axis)."""
        b, h, w, c = pixels.shape
        if self.latent_dim == 3:
            return (1, c, b, h, w) if not self.not_video else (b, c, 1, h, w)
        return (b, c, h, w)

    def _fp32(self, run):
        """Run again with the VAE in fp32 (fp16 overflow is the usual cause of NaN)."""
        dtype = self.vae_dtype
        self.vae_dtype = torch.float32
        self.first_stage_model.to(torch.float32)
        try:
            return run()
        finally:
            self.vae_dtype = dtype
            self.first_stage_model.to(dtype)

    def _guard(self, what: str, run):
        out = run()
        if torch.isfinite(out).all():
            return out
        log.warning("%s: the %s holds NaN/inf in %s; redoing it in fp32", self.path, what, self.vae_dtype)
        out = self._fp32(run)
        if not torch.isfinite(out).all():
            raise GGUFError(self.path, f"the VAE {what} holds NaN/inf even in fp32: the latent itself is not "
                                       "finite (see the sampler's output) or this VAE file is damaged")
        return out

    def check_latent(self, samples: torch.Tensor) -> None:
        if samples.shape[1] != self.latent_channels:
            raise GGUFError(self.path, f"this VAE decodes {self.latent_channels}-channel latents but the latent "
                                       f"has {samples.shape[1]} channels: VAE and model do not belong together")

    def decode(self, samples_in, vae_options={}):
        self.check_latent(samples_in)
        spatial = samples_in.shape[-2:]
        if not self._fits(self.memory_used_decode(samples_in.shape, self.vae_dtype)):
            size = f"{spatial[-1] * self.spacial_compression_decode()}x{spatial[-2] * self.spacial_compression_decode()}"
            log.info("%s: a %s decode would not fit in free memory; decoding in %d px tiles", self.path, size,
                     self.tile_size)
            return self._guard("decode", lambda: self.decode_tiled(samples_in, **self._tile_args(self.tile_size)))
        return self._guard("decode", lambda: super(GuardedVAE, self).decode(samples_in, vae_options))

    def encode(self, pixel_samples):
        if not self.can_encode:
            raise GGUFError(self.path, "this VAE file holds only the decoder, so it cannot encode images (edit and "
                                       f"image-to-image graphs need the full VAE, {self.family.file_hint})")
        if not self._fits(self.memory_used_encode(self._encode_shape(pixel_samples), self.vae_dtype)):
            log.info("%s: an encode of %s would not fit in free memory; encoding in %d px tiles", self.path,
                     tuple(pixel_samples.shape[1:3]), self.tile_size)
            tile = self.tile_size
            return self._guard("encode", lambda: self.encode_tiled(pixel_samples, tile_x=tile, tile_y=tile,
                                                                   overlap=tile // 8))
        return self._guard("encode", lambda: super(GuardedVAE, self).encode(pixel_samples))


def load_vae(path: str, tile_size: int = DEFAULT_TILE) -> GuardedVAE:
    family, sd = open_vae(path)
    if "decoder.up_blocks.0.resnets.0.norm1.weight" in sd:  # diffusers naming: ComfyUI renames it too
        sd = comfy.diffusers_convert.convert_vae_state_dict(sd)
    can_encode = check_weights(family, sd, path)
    vae = GuardedVAE(sd=sd)
    vae.throw_exception_if_invalid()
    vae.family, vae.path, vae.tile_size, vae.can_encode = family, path, tile_size, can_encode
    log.info("VAE %s: %s, for %s", path, family.description, family.used_by)
    return vae


def check_pair(vae, model) -> None:
    """Raise if ``vae`` cannot decode latents of ``model`` (for instance the Flux VAE on Qwen-Image)."""
    latent_format = type(model.model.latent_format).__name__
    wanted = LATENT_FORMATS.get(latent_format)
    family = getattr(vae, "family", None)
    if wanted is None or family is None or family is wanted:
        return
    raise GGUFError(getattr(vae, "path", None), f"this is {family.description}, for {family.used_by}, but the model "
                                                f"makes {wanted.used_by} latents, which need {wanted.description} "
                                                f"({wanted.file_hint})")
