"""The tensors a GGUF diffusion model is checked against, built as under ComfyUI's dynamic VRAM loader
(whose Linear layers create no weight until loaded), against the file's own; and what ComfyUI's own
loading of the weights warns of."""

import logging

import comfy.memory_management
from script_helpers import loaded_module


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run(cfg):
    pkg = loaded_module(cfg, cfg["package"])
    diffusion = pkg.nodes.integration.diffusion
    out = {}
    for name in cfg["ggufs"]:
        dm = pkg.loaders.models.diffusion.open_diffusion_model(f"{cfg['root']}/diffusion_models/{name}")
        comfy.memory_management.aimdo_enabled = True
        try:
            expected = diffusion.expected_tensors(dm)
        finally:
            comfy.memory_management.aimdo_enabled = False
        held = {k: tuple(pkg.loaders.quant.weight.logical_shape(t)) for k, t in dm.state_dict.items()}
        out[name] = {"missing": sorted(set(expected) - set(held)), "unexpected": sorted(set(held) - set(expected)),
                     "misshaped": sorted(k for k in expected if k in held and expected[k] != held[k]),
                     "linear_weights": sum(k.endswith(".weight") and len(s) == 2 for k, s in expected.items())}
        warnings = Warnings()
        logging.getLogger().addHandler(warnings)
        try:
            diffusion.load_gguf_unet(f"{cfg['root']}/diffusion_models/{name}", "on the fly")
        finally:
            logging.getLogger().removeHandler(warnings)
        out[name]["warnings"] = warnings.messages
    return out
