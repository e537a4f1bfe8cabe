"""VAE files: which family a VAE belongs to, and clear errors for everything else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors.torch import save_file

from loaders.gguf.errors import GGUFError
from loaders.models.vae import FLUX, WAN21, open_vae
from loaders.gguf.writer import write_gguf


def wan(z: int = 16) -> dict:
    return {"decoder.middle.0.residual.0.gamma": torch.ones(64, 1, 1, 1), "decoder.conv1.weight": torch.zeros(64, z, 3, 3, 3),
            "decoder.head.0.gamma": torch.ones(16, 1, 1, 1), "decoder.head.2.weight": torch.zeros(3, 16, 3, 3, 3),
            "encoder.conv1.weight": torch.zeros(16, 3, 3, 3, 3)}


def kl(z: int) -> dict:
    return {"decoder.conv_in.weight": torch.zeros(512, z, 3, 3), "encoder.conv_out.weight": torch.zeros(2 * z, 512, 3, 3)}


@pytest.mark.parametrize("sd, family", [(wan(), WAN21), (kl(16), FLUX)])
def test_families(tmp_path, sd, family):
    save_file(sd, str(tmp_path / "v.safetensors"))
    assert open_vae(str(tmp_path / "v.safetensors"))[0] is family
    prefixed = {f"first_stage_model.{k}": v for k, v in sd.items()}
    save_file(prefixed, str(tmp_path / "p.safetensors"))
    found, weights = open_vae(str(tmp_path / "p.safetensors"))
    assert found is family and set(weights) == set(sd)


def test_gguf_with_five_dimensional_weights(tmp_path):
    sd = {k: v.numpy() + np.random.default_rng(0).standard_normal(v.shape).astype(np.float32) for k, v in wan().items()}
    write_gguf(tmp_path / "v.gguf", sd, lambda n, s: T.F16)
    family, weights = open_vae(str(tmp_path / "v.gguf"))
    assert family is WAN21
    assert weights["decoder.conv1.weight"].shape == (64, 16, 3, 3, 3)
    np.testing.assert_array_equal(weights["decoder.conv1.weight"].float().numpy(),
                                  sd["decoder.conv1.weight"].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("sd, fragment", [
    (kl(4), "4 latent channels"),
    (wan(48), "48 latent channels"),
    ({"model.diffusion_model.x.weight": torch.zeros(4, 4)}, "not a VAE of a known kind"),
])
def test_wrong_vaes(tmp_path, sd, fragment):
    save_file(sd, str(tmp_path / "v.safetensors"))
    with pytest.raises(GGUFError) as info:
        open_vae(str(tmp_path / "v.safetensors"))
    assert "v.safetensors" in str(info.value) and fragment in str(info.value)


def test_damaged_safetensors(tmp_path):
    (tmp_path / "v.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(GGUFError) as info:
        open_vae(str(tmp_path / "v.safetensors"))
    assert "cannot be read as safetensors" in str(info.value)


@pytest.mark.parametrize("change, fragment", [
    (lambda sd: sd.pop("decoder.head.2.weight"), "missing decoder.head.2.weight"),
    (lambda sd: sd.update({"encoder.conv1.weight": torch.zeros(16, 3)}), "encoder.conv1.weight has 2 dimensions"),
])
def test_tensors_the_sizes_come_from(tmp_path, change, fragment):
    """ComfyUI reads the VAE's sizes from these: without them it stops with a bare KeyError."""
    sd = wan()
    change(sd)
    for name in ("v.safetensors", "v.gguf"):
        if name.endswith(".gguf"):
            write_gguf(tmp_path / name, {k: v.numpy() for k, v in sd.items()}, lambda n, s: T.F32)
        else:
            save_file(sd, str(tmp_path / name))
        with pytest.raises(GGUFError) as info:
            open_vae(str(tmp_path / name))
        assert name in str(info.value) and fragment in str(info.value), str(info.value)


def test_integer_weights_are_refused(tmp_path):
    save_file(dict(wan(), **{"decoder.head.0.gamma": torch.ones(16, 1, 1, 1, dtype=torch.int32)}),
              str(tmp_path / "v.safetensors"))
    with pytest.raises(GGUFError) as info:
        open_vae(str(tmp_path / "v.safetensors"))
    assert "decoder.head.0.gamma holds torch.int32 values, not floats" in str(info.value)


def test_only_regular_files_are_opened(tmp_path):
    import os
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(GGUFError) as info:
        open_vae(str(tmp_path / "pipe.safetensors"))
    assert "pipe.safetensors" in str(info.value) and "not a regular file" in str(info.value)
