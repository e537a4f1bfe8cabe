"""Writes the preset workflows (ComfyUI's UI format) from the graphs described here.

Node inputs, widget order and output types come from a running ComfyUI's /object_info, so every
widget lands where the front end expects it. The file names are the titles ComfyUI's template
browser shows; ``order.txt`` gives the order the package's front-end extension lists them in, and
each preset gets a thumbnail card (``<title>.jpg``) naming its model, steps and sampler:

    python workflows/build_presets.py http://127.0.0.1:8188   # a ComfyUI with this package installed
    python workflows/to_api.py                                # then refresh the API-format twins
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
PACKAGE_ID = "comfyui-qwenimage-gguf"
PACKAGE_VERSION = "0.1.0"

sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "loaders"))
from downloads import DEFAULT_ENDPOINT, load_manifest  # noqa: E402
from to_api import DYNAMIC_COMBO, FRONTEND_ONLY, WIDGET_TYPES, object_info, widget_inputs  # noqa: E402

MODELS = load_manifest().files  # the download entries of the loader nodes

VIEW = (1600, 900)
VIEW_MARGINS = (70, 100, 30, 30)  # left (side bar), top (menu bar), right, bottom, in screen pixels
TITLE_HEIGHT = 30

NEGATIVE_ZH = "低分辨率，低画质，肢体畸形，手指畸形，画面过饱和，蜡像感，人脸无细节，过度光滑，画面具有AI感。构图混乱。文字模糊，扭曲"
PROMPT_T2I = ("A cozy bookshop café on a rainy evening, warm light spilling from the window onto wet cobblestones. "
              "A chalkboard sign by the door reads \"Qwen-Image GGUF · Open Late\" in neat handwriting, and a "
              "wooden hanging sign says \"书与咖啡\". Inside, shelves of old books, a ginger cat asleep on a "
              "stack of novels, steam rising from a cup of coffee. Photorealistic, 35mm, shallow depth of field.")
PROMPT_EDIT_1 = "Make it a snowy winter evening: snow on the ground and roof, warm light in the windows."
PROMPT_EDIT_2 = "Put the object from image 2 on the table in image 1, matching the light and perspective of image 1."
PROMPT_INPAINT = ("A hot air balloon with red and yellow stripes drifting in the clear blue sky, soft sunlight, "
                  "flat illustration style matching the picture.")
PROMPT_EDIT_INPAINT = ("Put a hot air balloon with red and yellow stripes in the masked part of the sky, in the "
                       "picture's flat illustration style.")
PROMPT_Z = ("A lighthouse on a rocky cliff at sunrise, waves crashing below, seagulls in the pink sky, "
            "cinematic wide shot, highly detailed.")

RESOLUTIONS_NOTE = """### Resolutions
Qwen-Image is trained for these sizes (width x height):

| aspect | size |
|---|---|
| 1:1 | 1328 x 1328 |
| 16:9 | 1664 x 928 |
| 9:16 | 928 x 1664 |
| 4:3 | 1472 x 1140 |
| 3:4 | 1140 x 1472 |
"""

def small_gpu_note(edit: bool) -> str:
    """What to know on a small GPU, for the text-to-image presets or the edit ones."""
    size = ("- The input image is scaled to about one megapixel, its aspect ratio kept (FluxKontextImageScale), "
            "whatever its size.\n" if edit else
            "- A smaller image (1024 x 1024 or 928 x 1664) is faster; the smaller Q4_0 file (install.sh --quant "
            "Q4_0) needs a little less memory.\n")
    steps = ("- More steps cost time, not memory.\n" if edit else
             "- More steps cost time, not memory: 20 steps is the fast preview, 40 the default, 60 the finest.\n")
    return ("### On a small GPU\n"
            "- The GGUF weights stay quantized in VRAM; ComfyUI keeps what does not fit in RAM and streams it to "
            "the GPU. On an H100 with ComfyUI given 8 GB of VRAM, these presets completed using about 9 GB of the "
            "GPU and 32-38 GB of RAM (README, Presets).\n"
            + size
            + "- The VAE decodes in tiles by itself when the image would not fit; lower its tile size if needed.\n"
            + steps)


def model_entry(name: str) -> dict:
    return {"name": name, "url": MODELS[name].url(DEFAULT_ENDPOINT), "directory": MODELS[name].folder}


def extra_widget_values(opts: dict, widgets: dict) -> list:
    """Values the front end stores after a widget for controls of its own: the seed's
    control_after_generate and the image loader's upload button."""
    if opts.get("control_after_generate"):
        return [widgets.pop("control_after_generate", "fixed")]
    if opts.get("image_upload"):
        return [widgets.pop("upload", "image")]
    return []


class Graph:
    """A UI-format graph built node by node against /object_info."""

    def __init__(self, info: dict):
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, type_: str, pos: tuple[int, int], size: tuple[int, int] = (320, 130), title: str | None = None,
            **widgets) -> dict:
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": type_}, "widgets_values": []}
        if title:
            node["title"] = title
        if type_ in FRONTEND_ONLY:
            node["widgets_values"] = [widgets.pop("text")]
            node["properties"] = {}
            node["color"], node["bgcolor"] = "#432", "#653"
            self.nodes.append(node)
            return node
        spec = self.info[type_]
        ours = spec.get("python_module", "").startswith("custom_nodes")
        node["properties"].update({"cnr_id": PACKAGE_ID if ours else "comfy-core",
                                   "ver": PACKAGE_VERSION if ours else "0.33.0"})
        for section in ("required", "optional"):
            for name in spec.get("input_order", {}).get(section, []):
                kind, opts = spec["input"][section][name][0], spec["input"][section][name][1] if len(spec["input"][section][name]) > 1 else {}
                is_widget = isinstance(kind, list) or kind in WIDGET_TYPES or kind == DYNAMIC_COMBO
                entry = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind, "link": None}
                if is_widget:
                    entry["widget"] = {"name": name}
                    first = kind[0] if isinstance(kind, list) and kind else (
                        opts["options"][0]["key"] if kind == DYNAMIC_COMBO else None)
                    value = widgets.pop(name, opts.get("default", first))
                    node["widgets_values"].append(value)
                    node["widgets_values"].extend(extra_widget_values(opts, widgets))
                    if kind == DYNAMIC_COMBO:  # the chosen option's own widgets follow, given as "combo.input"
                        option = next((o for o in opts["options"] if o["key"] == value), None)
                        if option is None:
                            raise KeyError(f"{type_}.{name}: no option {value!r}")
                        for sub, count, sub_entry in widget_inputs({"input": option["inputs"]}, []):
                            sub_opts = sub_entry[1] if len(sub_entry) > 1 else {}
                            node["widgets_values"].append(widgets.pop(f"{name}.{sub}", sub_opts.get("default")))
                    if section == "optional" and value is None:
                        node["widgets_values"].pop()
                        continue
                node["inputs"].append(entry)
        if widgets:
            raise KeyError(f"{type_}: no widget named {sorted(widgets)}")
        for i, (kind, name) in enumerate(zip(spec["output"], spec["output_name"])):
            node["outputs"].append({"name": name, "type": kind, "links": [], "slot_index": i})
        models = [model_entry(v) for v in node["widgets_values"] if isinstance(v, str) and v in MODELS]
        if models:
            node["properties"]["models"] = models
        self.nodes.append(node)
        return node

    def connect(self, src: dict, output: int | str, dst: dict, input_name: str) -> None:
        slot = output if isinstance(output, int) else [o["name"] for o in src["outputs"]].index(output)
        dst_slot = next(i for i, e in enumerate(dst["inputs"]) if e["name"] == input_name)
        link_id = len(self.links) + 1
        kind = src["outputs"][slot]["type"]
        self.links.append([link_id, src["id"], slot, dst["id"], dst_slot, kind])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][dst_slot]["link"] = link_id

    def group(self, title: str, x: int, y: int, w: int, h: int, color: str = "#3f789e") -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x, y, w, h], "color": color,
                            "font_size": 24, "flags": {}})

    def view(self) -> dict:
        """The saved view: the whole graph, group titles included, inside a 1600 x 900 window below
        the front end's menu bar (a template is fitted to the window by the front end itself)."""
        boxes = [(*n["pos"], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in self.nodes]
        boxes += [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in self.groups)]
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes) - TITLE_HEIGHT
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        (width, height), (left, top, right, bottom) = VIEW, VIEW_MARGINS
        scale = min(1.0, (width - left - right) / (x1 - x0), (height - top - bottom) / (y1 - y0))
        return {"scale": round(scale, 4), "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)]}

    def to_json(self) -> dict:
        return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": self.view()}, "version": 0.4}


def loaders(g: Graph, unet: str, clip: str, mmproj: str, vae: str, x: int = 0, y: int = 0):
    g.group("1. Models (GGUF)", x - 20, y - 60, 380, 610)
    model = g.add("QwenImageGGUFUnetLoader", (x, y), (340, 106), unet_name=unet)
    guard = g.add("QwenImageGGUFNaNGuard", (x, y + 150), (340, 50))
    g.connect(model, 0, guard, "model")
    clip_node = g.add("QwenImageGGUFClipLoader", (x, y + 250), (340, 106), clip_name=clip, mmproj_name=mmproj)
    vae_node = g.add("QwenImageGGUFVAELoader", (x, y + 410), (340, 82), vae_name=vae, tile_size=512)
    return guard, clip_node, vae_node


def prompt_pair(g: Graph, clip: dict, group: str) -> tuple[dict, dict]:
    g.group(group, 400, -60, 460, 640, "#8A8")
    pos = g.add("CLIPTextEncode", (420, 0), (420, 220), title="Positive prompt", text=PROMPT_T2I)
    neg = g.add("CLIPTextEncode", (420, 260), (420, 160), title="Negative prompt", text=NEGATIVE_ZH)
    g.connect(clip, 0, pos, "clip")
    g.connect(clip, 0, neg, "clip")
    return pos, neg


def ksampler(g: Graph, pos: tuple[int, int], model: dict, positive: dict, negative: dict, latent: dict,
             size: tuple[int, int] = (340, 270), cfg: float = 4.0, denoise: float = 1.0, **widgets) -> dict:
    sampler = g.add("KSampler", pos, size, seed=42, cfg=cfg, denoise=denoise, **widgets)
    for src, name in ((model, "model"), (positive, "positive"), (negative, "negative"), (latent, "latent_image")):
        g.connect(src, 0, sampler, name)
    return sampler


def decode_and_save(g: Graph, sampler: dict, vae: dict, model: dict, prefix: str, x: int, y: int) -> dict:
    decode = g.add("QwenImageGGUFVAEDecode", (x, y), (260, 80))
    g.connect(sampler, 0, decode, "samples")
    g.connect(vae, 0, decode, "vae")
    g.connect(model, 0, decode, "model")
    save = g.add("SaveImage", (x, y + 130), (600, 640), filename_prefix=prefix)
    g.connect(decode, 0, save, "images")
    return decode


def sampling_group(g: Graph, x: int, title: str, model: dict, positive: dict, negative: dict, shift: float,
                   size: tuple[int, int], top: int = 0, height: int = 640, **sampler) -> dict:
    """The sampling column of a text-to-image preset at ``x``, from ``top`` down: the shift, an empty
    latent of ``size`` and a KSampler (``sampler``: its widgets), in a group titled ``title`` (of
    ``height``, room for nodes above ``top``); returns the KSampler."""
    g.group(title, x - 20, -60, 380, height, "#b58b2a")
    shifted = g.add("ModelSamplingAuraFlow", (x, top), (340, 60), shift=shift)
    g.connect(model, 0, shifted, "model")
    latent = g.add("EmptySD3LatentImage", (x, top + 100), (340, 110), width=size[0], height=size[1], batch_size=1)
    return ksampler(g, (x, top + 250), shifted, positive, negative, latent, control_after_generate="randomize",
                    **sampler)


def masked_latent(g: Graph, image: dict, vae: dict, y: int) -> dict:
    """The image encoded, sampled only where its mask (the image's transparency) is."""
    encode = g.add("VAEEncode", (1340, y), (340, 50))
    g.connect(image, 0, encode, "pixels")
    g.connect(vae, 0, encode, "vae")
    masked = g.add("SetLatentNoiseMask", (1340, y + 100), (340, 50))
    g.connect(encode, 0, masked, "samples")
    g.connect(image, 1, masked, "mask")
    return masked


def paste_back(g: Graph, sampler: dict, image: dict, vae: dict, model: dict, prefix: str, height: int) -> None:
    """Group 4 of the inpainting presets: the sampled image decoded, pasted into the original inside the
    mask only (the pixels outside it stay exactly the original's), and saved."""
    g.group("4. Paste into the original and save", 1720, -60, 640, height, "#a1309b")
    decode = g.add("QwenImageGGUFVAEDecode", (1740, 0), (260, 80))
    g.connect(sampler, 0, decode, "samples")
    g.connect(vae, 0, decode, "vae")
    g.connect(model, 0, decode, "model")
    paste = g.add("ImageCompositeMasked", (2020, 0), (320, 150), x=0, y=0, resize_source=False)
    g.connect(image, 0, paste, "destination")
    g.connect(decode, 0, paste, "source")
    g.connect(image, 1, paste, "mask")
    save = g.add("SaveImage", (1740, 200), (600, 640), filename_prefix=prefix)
    g.connect(paste, 0, save, "images")


def edit_references(g: Graph, positive: dict, negative: dict) -> list[dict]:
    """Edit-2511's conditionings with their reference latents given as its authors sample it."""
    refs = []
    for i, enc in enumerate((positive, negative)):
        ref = g.add("FluxKontextMultiReferenceLatentMethod", (1340, 0 + 100 * i), (340, 60),
                    reference_latents_method="index_timestep_zero")
        g.connect(enc, 0, ref, "conditioning")
        refs.append(ref)
    return refs


def edit_model(g: Graph, model: dict, y: int, shift: float) -> dict:
    """Edit-2511's model as it samples: its flow shift, then CFGNorm (from ``y`` down)."""
    shifted = g.add("ModelSamplingAuraFlow", (1340, y), (340, 60), shift=shift)
    g.connect(model, 0, shifted, "model")
    norm = g.add("CFGNorm", (1340, y + 100), (340, 82), strength=1.0)
    g.connect(shifted, 0, norm, "model")
    return norm


def qwen_2512(info: dict, mmproj: str = "mmproj-F16.gguf") -> tuple[Graph, dict, dict, dict]:
    """A graph starting with the Qwen-Image-2512 presets' loaders: (graph, guarded model, clip, vae)."""
    g = Graph(info)
    return (g, *loaders(g, "qwen-image-2512-Q4_K_M.gguf", "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf", mmproj,
                        "qwen_image_vae.safetensors"))


def qwen_t2i(info: dict, steps: int) -> dict:
    g, guard, clip, vae = qwen_2512(info)
    pos, neg = prompt_pair(g, clip, "2. Prompt")
    sampler = sampling_group(g, 900, f"3. Sampling: DPM++ 2M Karras, {steps} steps", guard, pos, neg, 3.1,
                             (1328, 1328), steps=steps, sampler_name="dpmpp_2m", scheduler="karras")
    g.group("4. Decode and save", 1280, -60, 640, 900, "#a1309b")
    decode_and_save(g, sampler, vae, guard, f"qwen-image-2512-{steps}steps", 1300, 0)
    g.add("MarkdownNote", (-20, 580), (380, 300), text=RESOLUTIONS_NOTE)
    g.add("MarkdownNote", (400, 620), (460, 300), text=(
        f"## Qwen-Image-2512 text to image, GGUF, {steps} steps\nQ4_K_M diffusion model, Qwen2.5-VL-7B Q4_K_M text "
        "encoder with its mmproj, Qwen VAE. DPM++ 2M with the Karras schedule, CFG 4, shift 3.1. The NaN Guard "
        "redoes any step that overflows in fp32 instead of letting it turn the image black.\n\n" + small_gpu_note(False)))
    return g.to_json()


LIGHTNING = {  # (model set, steps) -> the LoRA of lightx2v's Qwen-Image Lightning releases
    ("2512", 4): "Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors",
    ("2512", 8): "Qwen-Image-2512-Lightning-8steps-V1.0-bf16.safetensors",
    ("2511", 4): "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",
}
LIGHTNING_NOTE = ("The Lightning LoRA (lightx2v) is distilled for {steps} steps: its authors sample with "
                  "flow-matching Euler at shift 3 and CFG 1, as here. At CFG 1 ComfyUI runs one forward per step "
                  "and the negative prompt has no effect. The LoRA runs on the GGUF weights in low-rank form.")


def lightning_lora(g: Graph, model: dict, name: str, pos: tuple[int, int]) -> dict:
    lora = g.add("LoraLoaderModelOnly", pos, (340, 82), lora_name=name, strength_model=1.0)
    g.connect(model, 0, lora, "model")
    return lora


def qwen_lightning(info: dict, steps: int) -> dict:
    g, guard, clip, vae = qwen_2512(info)
    g.group("2. Prompt", 400, -60, 460, 400, "#8A8")
    pos = g.add("CLIPTextEncode", (420, 0), (420, 220), title="Positive prompt", text=PROMPT_T2I)
    g.connect(clip, 0, pos, "clip")
    zero = g.add("ConditioningZeroOut", (420, 260), (300, 30))
    g.connect(pos, 0, zero, "conditioning")
    lora = lightning_lora(g, guard, LIGHTNING["2512", steps], (900, 0))
    sampler = sampling_group(g, 900, f"3. Sampling: Lightning, {steps} steps, CFG 1", lora, pos, zero, 3.0,
                             (1328, 1328), top=130, height=760, cfg=1.0, steps=steps, sampler_name="euler",
                             scheduler="simple")
    g.group("4. Decode and save", 1280, -60, 640, 900, "#a1309b")
    decode_and_save(g, sampler, vae, guard, f"qwen-image-2512-lightning-{steps}steps", 1300, 0)
    g.add("MarkdownNote", (-20, 580), (380, 300), text=RESOLUTIONS_NOTE)
    g.add("MarkdownNote", (400, 400), (460, 360), text=(
        f"## Qwen-Image-2512, Lightning {steps} steps, GGUF\n" + LIGHTNING_NOTE.format(steps=steps)
        + " For the finest detail use the 40- or 60-step presets without the LoRA."))
    return g.to_json()


def qwen_two_stage(info: dict) -> dict:
    g, guard, clip, vae = qwen_2512(info)
    pos, neg = prompt_pair(g, clip, "2. Prompt")
    g.group("3. Coarse: 25 steps at 1024 x 1024", 880, -60, 380, 640, "#b58b2a")
    shift = g.add("ModelSamplingAuraFlow", (900, 0), (340, 60), shift=3.1)
    g.connect(guard, 0, shift, "model")
    latent = g.add("EmptySD3LatentImage", (900, 100), (340, 110), width=1024, height=1024, batch_size=1)
    coarse = ksampler(g, (900, 250), shift, pos, neg, latent, title="KSampler (coarse)",
                      control_after_generate="randomize", steps=25, sampler_name="dpmpp_2m", scheduler="karras")
    g.group("4. Fine: 15 steps at 1328 x 1328", 1280, -60, 380, 640, "#b58b2a")
    upscale = g.add("LatentUpscale", (1300, 0), (340, 130), upscale_method="bislerp", width=1328, height=1328,
                    crop="disabled")
    g.connect(coarse, 0, upscale, "samples")
    # Denoise 0.45: the composition stays, the detail is redrawn.
    fine = ksampler(g, (1300, 250), shift, pos, neg, upscale, title="KSampler (refine)", denoise=0.45,
                    control_after_generate="fixed", steps=15, sampler_name="dpmpp_2m", scheduler="karras")
    g.group("5. Decode and save", 1680, -60, 640, 900, "#a1309b")
    decode_and_save(g, fine, vae, guard, "qwen-image-2512-two-stage", 1700, 0)
    g.add("MarkdownNote", (-20, 580), (380, 300), text=RESOLUTIONS_NOTE)
    g.add("MarkdownNote", (400, 620), (840, 260), text=(
        "## Qwen-Image-2512 in two stages, GGUF\n"
        "**Coarse** (group 3): 25 DPM++ 2M Karras steps at 1024 x 1024 (59% of the pixels of 1328 x 1328) "
        "settle the composition. **Fine** (group 4): the latent is enlarged to 1328 x 1328 and "
        "15 more steps at denoise 0.45 redraw the detail at full size while keeping the composition (raise "
        "the denoise for more change, lower it to stay closer). Both stages share the prompt, the model and "
        "the shift; the refine seed is fixed so only the coarse seed varies between runs."))
    return g.to_json()


def qwen_inpaint(info: dict) -> dict:
    g, guard, clip, vae = qwen_2512(info)
    g.group("2. Image, mask and prompt", 400, -60, 900, 860, "#8A8")
    image = g.add("LoadImage", (420, 0), (420, 420), image="qwen_inpaint_input.png", upload="image")
    pos = g.add("CLIPTextEncode", (860, 0), (420, 200), title="What to paint in the mask", text=PROMPT_INPAINT)
    neg = g.add("CLIPTextEncode", (860, 240), (420, 160), title="Negative prompt", text=NEGATIVE_ZH)
    for enc in (pos, neg):
        g.connect(clip, 0, enc, "clip")
    g.group("3. Sampling inside the mask: 30 steps", 1320, -60, 380, 860, "#b58b2a")
    masked = masked_latent(g, image, vae, 0)
    shift = g.add("ModelSamplingAuraFlow", (1340, 200), (340, 60), shift=3.1)
    g.connect(guard, 0, shift, "model")
    sampler = ksampler(g, (1340, 300), shift, pos, neg, masked, control_after_generate="randomize", steps=30,
                       sampler_name="dpmpp_2m", scheduler="karras")
    paste_back(g, sampler, image, vae, guard, "qwen-image-2512-inpaint", 900)
    g.add("MarkdownNote", (-20, 580), (380, 320), text=(
        "## Qwen-Image-2512 inpainting, GGUF\nThe mask is the image's transparency: right-click the image > "
        "Open in MaskEditor to paint your own, then describe what belongs there. Only the masked part is "
        "sampled (a latent noise mask); the original pixels outside it are pasted back after decoding. Images "
        "near 1 megapixel work best (sides a multiple of 16)."))
    return g.to_json()


ENHANCE_TEMPLATE = (
    "<|im_start|>system\nYou are a prompt writer for a text-to-image model. Rewrite the user's idea as one "
    "detailed image description of 60 to 120 words. Keep every subject, number and quoted text of the idea "
    "exactly; add what it leaves open: the setting and time of day, the composition and camera angle, the "
    "lighting, the colours, the materials and textures, and the style. Write in the language of the idea "
    "(Chinese or English). Answer with the description only.<|im_end|>\n"
    "<|im_start|>user\n{idea}<|im_end|>\n<|im_start|>assistant\n")
IDEA = "a ginger cat asleep on a stack of old books in a rainy-day bookshop window"


def qwen_enhanced(info: dict) -> dict:
    g, guard, clip, vae = qwen_2512(info)
    g.group("2. Your idea, written out by Qwen2.5-VL", 400, -60, 900, 1040, "#8A8")
    idea = g.add("PrimitiveStringMultiline", (420, 0), (420, 140), title="Your idea (short)", value=IDEA)
    template = g.add("PrimitiveStringMultiline", (420, 180), (420, 300), title="Instructions to the language model",
                     value=ENHANCE_TEMPLATE)
    filled = g.add("StringReplace", (420, 520), (420, 190), find="{idea}", replace="", string="")
    g.connect(template, 0, filled, "string")
    g.connect(idea, 0, filled, "replace")
    generate = g.add("TextGenerate", (860, 0), (420, 430), prompt="", max_length=320, sampling_mode="on")
    g.connect(clip, 0, generate, "clip")
    g.connect(filled, 0, generate, "prompt")
    shown = g.add("PreviewAny", (860, 480), (420, 250), title="The written-out prompt")
    g.connect(generate, 0, shown, "source")
    pos = g.add("CLIPTextEncode", (860, 790), (420, 90), title="Positive prompt", text="")
    g.connect(clip, 0, pos, "clip")
    g.connect(generate, 0, pos, "text")
    neg = g.add("CLIPTextEncode", (420, 770), (420, 160), title="Negative prompt", text=NEGATIVE_ZH)
    g.connect(clip, 0, neg, "clip")
    sampler = sampling_group(g, 1340, "3. Sampling: DPM++ 2M Karras, 40 steps", guard, pos, neg, 3.1, (1328, 1328),
                             steps=40, sampler_name="dpmpp_2m", scheduler="karras")
    g.group("4. Decode and save", 1720, -60, 640, 900, "#a1309b")
    decode_and_save(g, sampler, vae, guard, "qwen-image-2512-enhanced", 1740, 0)
    g.add("MarkdownNote", (-20, 580), (380, 380), text=(
        "## Qwen-Image-2512 with a written-out prompt, GGUF\nQwen-Image follows long, concrete prompts best. "
        "ComfyUI's Generate Text node has the Qwen2.5-VL-7B text encoder (the same GGUF file, its output head "
        "included) write your short idea out: setting, composition, light, colour, texture and style, in the "
        "idea's language. The result is shown in \"The written-out prompt\" and encoded as the positive "
        "prompt. The wording stays the same from run to run until you change Generate Text's seed. Keep the "
        "instructions starting with <|im_start|>: otherwise the text encoder wraps them in its own template."))
    return g.to_json()


def qwen_edit(info: dict, images: int, lightning: bool = False) -> dict:
    g = Graph(info)
    guard, clip, vae = loaders(g, "qwen-image-edit-2511-Q4_K_M.gguf", "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf",
                               "mmproj-F16.gguf", "qwen_image_vae.safetensors")
    g.group("2. Input images and instruction", 400, -60, 900, 860, "#8A8")
    loads = [g.add("LoadImage", (420 + 300 * i, 0), (280, 320), image=f"qwen_edit_input_{i + 1}.png", upload="image")
             for i in range(images)]
    scaled = g.add("FluxKontextImageScale", (420, 360), (280, 40))
    g.connect(loads[0], 0, scaled, "image")
    prompt = PROMPT_EDIT_1 if images == 1 else PROMPT_EDIT_2
    pos = g.add("TextEncodeQwenImageEditPlus", (720, 360), (420, 200), title="Instruction", prompt=prompt)
    neg = g.add("TextEncodeQwenImageEditPlus", (720, 600), (420, 170), title="Negative", prompt="")
    for enc in (pos, neg):
        g.connect(clip, 0, enc, "clip")
        g.connect(vae, 0, enc, "vae")
        for i, load in enumerate(loads):
            g.connect(load, 0, enc, f"image{i + 1}")
    # (steps, CFG, shift, the rows the Lightning LoRA's loader takes above the shift)
    steps, cfg, shift_by, room = (4, 1.0, 3.0, 130) if lightning else (40, 4.0, 3.1, 0)
    g.group(f"3. Sampling: {'Lightning, ' if lightning else ''}{steps} steps, CFG {cfg:g}", 1320, -60, 380,
            900 + room, "#b58b2a")
    refs = edit_references(g, pos, neg)
    model = lightning_lora(g, guard, LIGHTNING["2511", steps], (1340, 220)) if lightning else guard
    norm = edit_model(g, model, 220 + room, shift_by)
    y = 320 + room
    encode = g.add("VAEEncode", (1340, y + 130), (340, 50))
    g.connect(scaled, 0, encode, "pixels")
    g.connect(vae, 0, encode, "vae")
    sampler = ksampler(g, (1340, y + 230), norm, refs[0], refs[1], encode, cfg=cfg,
                       control_after_generate="randomize", steps=steps, sampler_name="euler", scheduler="simple")
    g.group("4. Decode and save", 1720, -60, 640, 900 + room, "#a1309b")
    decode_and_save(g, sampler, vae, guard, f"qwen-image-edit-2511-{'lightning-' if lightning else ''}{images}img",
                    1740, 0)
    g.add("MarkdownNote", (-20, 580), (380, 320), text=(
        f"## Qwen-Image-Edit-2511{', Lightning 4 steps' if lightning else ''}, GGUF\nThe mmproj file gives the text "
        "encoder its vision tower: without it the edit nodes cannot see the images (the loader says so). Replace the "
        f"input images with your own ({'one image' if images == 1 else 'image 1 is edited, image 2 is the reference'})."
        + ("\n\n" + LIGHTNING_NOTE.format(steps=steps) if lightning else "\n\n" + small_gpu_note(True))))
    return g.to_json()


def qwen_edit_inpaint(info: dict) -> dict:
    g = Graph(info)
    guard, clip, vae = loaders(g, "qwen-image-edit-2511-Q4_K_M.gguf", "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf",
                               "mmproj-F16.gguf", "qwen_image_vae.safetensors")
    g.group("2. Image, mask and instruction", 400, -60, 900, 1040, "#8A8")
    image = g.add("LoadImage", (420, 0), (420, 420), image="qwen_inpaint_input.png", upload="image")
    pos = g.add("TextEncodeQwenImageEditPlus", (860, 0), (420, 200), title="Instruction", prompt=PROMPT_EDIT_INPAINT)
    neg = g.add("TextEncodeQwenImageEditPlus", (860, 240), (420, 170), title="Negative", prompt="")
    for enc in (pos, neg):
        g.connect(clip, 0, enc, "clip")
        g.connect(vae, 0, enc, "vae")
        g.connect(image, 0, enc, "image1")
    g.group("3. In the mask: 40 steps, CFG 4", 1320, -60, 380, 1040, "#b58b2a")
    refs = edit_references(g, pos, neg)
    norm = edit_model(g, guard, 220, 3.1)
    masked = masked_latent(g, image, vae, 450)
    sampler = ksampler(g, (1340, 650), norm, refs[0], refs[1], masked, control_after_generate="randomize",
                       steps=40, sampler_name="euler", scheduler="simple")
    paste_back(g, sampler, image, vae, guard, "qwen-image-edit-2511-inpaint", 1040)
    g.add("MarkdownNote", (-20, 580), (380, 360), text=(
        "## Qwen-Image-Edit-2511 inpainting, GGUF\nThe edit model sees the whole picture (through the mmproj "
        "vision file) and your instruction, and samples only inside the mask: the image's transparency "
        "(right-click the image > Open in MaskEditor to paint your own). The original pixels outside the mask "
        "are pasted back after decoding. Unlike the Qwen-Image-2512 inpainting preset, the instruction can "
        "refer to what is in the picture (\"the same cat, asleep\"). Images near 1 megapixel work best (sides "
        "a multiple of 16)."))
    return g.to_json()


def z_image(info: dict) -> dict:
    g = Graph(info)
    guard, clip, vae = loaders(g, "z_image_turbo-Q4_K.gguf", "Qwen3-4B-Instruct-2507-Q4_K_M.gguf", "none",
                               "ae.safetensors")
    g.group("2. Prompt", 400, -60, 460, 400, "#8A8")
    pos = g.add("CLIPTextEncode", (420, 0), (420, 220), title="Prompt", text=PROMPT_Z)
    g.connect(clip, 0, pos, "clip")
    zero = g.add("ConditioningZeroOut", (420, 260), (300, 30))
    g.connect(pos, 0, zero, "conditioning")
    sampler = sampling_group(g, 900, "3. Sampling: 8 steps, CFG 1", guard, pos, zero, 3.0, (1024, 1024), steps=8,
                             cfg=1.0, sampler_name="res_multistep", scheduler="simple")
    g.group("4. Decode and save", 1280, -60, 640, 900, "#a1309b")
    decode_and_save(g, sampler, vae, guard, "z-image-turbo", 1300, 0)
    g.add("MarkdownNote", (-20, 580), (380, 260), text=(
        "## Z-Image-Turbo, GGUF\nQ4_K diffusion model, Qwen3-4B Q4_K_M text encoder (no mmproj), Flux VAE. "
        "A distilled model: 8 steps at CFG 1, so the negative prompt is zeroed out."))
    return g.to_json()


def step_comparison(info: dict) -> dict:
    g, guard, clip, vae = qwen_2512(info, mmproj="none")
    pos, neg = prompt_pair(g, clip, "2. One prompt, one seed")
    g.group("3. The same seed at 20, 40 and 60 steps", 880, -60, 1000, 1320, "#b58b2a")
    shift = g.add("ModelSamplingAuraFlow", (900, 0), (340, 60), shift=3.1)
    g.connect(guard, 0, shift, "model")
    latent = g.add("EmptySD3LatentImage", (900, 110), (340, 110), width=1024, height=1024, batch_size=1)
    labelled = []
    for i, steps in enumerate((20, 40, 60)):
        y = 270 + 330 * i
        sampler = ksampler(g, (900, y), shift, pos, neg, latent, (340, 290), title=f"KSampler {steps} steps",
                           control_after_generate="fixed", steps=steps, sampler_name="dpmpp_2m", scheduler="karras")
        decode = g.add("QwenImageGGUFVAEDecode", (1260, y), (260, 80))
        g.connect(sampler, 0, decode, "samples")
        g.connect(vae, 0, decode, "vae")
        g.connect(guard, 0, decode, "model")
        label = g.add("TextOverlay", (1540, y), (320, 300), text=f"{steps} steps", font_size=6.0,
                      color="#ffffff", position="top", align="left", outline=True)
        g.connect(decode, 0, label, "images")
        labelled.append(label)
    g.group("4. Side by side", 1900, -60, 1200, 760, "#a1309b")
    first = g.add("ImageStitch", (1920, 0), (280, 170), direction="right", match_image_size=True, spacing_width=16,
                  spacing_color="white")
    g.connect(labelled[0], 0, first, "image1")
    g.connect(labelled[1], 0, first, "image2")
    second = g.add("ImageStitch", (1920, 230), (280, 170), direction="right", match_image_size=True,
                   spacing_width=16, spacing_color="white")
    g.connect(first, 0, second, "image1")
    g.connect(labelled[2], 0, second, "image2")
    save = g.add("SaveImage", (2240, 0), (840, 420), filename_prefix="qwen-image-steps-20-40-60")
    g.connect(second, 0, save, "images")
    g.add("MarkdownNote", (-20, 580), (380, 300), text=(
        "## What do more steps buy?\nOne prompt and one fixed seed, sampled with DPM++ 2M Karras at 20, 40 and "
        "60 steps, saved side by side with the step count written on each image. Time grows with the steps; "
        "memory does not.\n\n" + RESOLUTIONS_NOTE))
    return g.to_json()


@dataclass(frozen=True)
class Preset:
    """A preset: its title ("model - variant", the file name the template browser shows) and the
    lines its thumbnail card lists under the title."""
    title: str
    build: Callable[[dict], dict]
    card: tuple[str, ...]


QWEN_T2I_CARD = ("Text to image, 1328 x 1328", "Qwen-Image-2512 Q4_K_M (GGUF)", "Qwen2.5-VL-7B Q4_K_M + mmproj",
                 "DPM++ 2M Karras, CFG 4")
LIGHTNING_CARD = ("Text to image, 1328 x 1328", "Qwen-Image-2512 Q4_K_M (GGUF)", "Lightning LoRA, Euler, CFG 1")
EDIT_CARD = ("Qwen-Image-Edit-2511 Q4_K_M (GGUF)", "Qwen2.5-VL-7B Q4_K_M + mmproj", "Euler, 40 steps, CFG 4")
# Titles short enough for the template browser's card (about 32 characters), the model first.
PRESETS = [
    Preset("Qwen-Image-2512 - 20 steps", lambda info: qwen_t2i(info, 20), QWEN_T2I_CARD),
    Preset("Qwen-Image-2512 - 40 steps", lambda info: qwen_t2i(info, 40), QWEN_T2I_CARD),
    Preset("Qwen-Image-2512 - 60 steps", lambda info: qwen_t2i(info, 60), QWEN_T2I_CARD),
    Preset("Qwen-Image-2512 - Lightning 4 steps", lambda info: qwen_lightning(info, 4), LIGHTNING_CARD),
    Preset("Qwen-Image-2512 - Lightning 8 steps", lambda info: qwen_lightning(info, 8), LIGHTNING_CARD),
    Preset("Qwen-Image-2512 - steps compared", step_comparison,
           ("20, 40 and 60 steps side by side",) + QWEN_T2I_CARD[1:]),
    Preset("Qwen-Image-2512 - two stages", qwen_two_stage,
           ("25 steps at 1024, 15 at 1328",) + QWEN_T2I_CARD[1:]),
    Preset("Qwen-Image-2512 - prompt written out", qwen_enhanced,
           ("Your idea written out by the LLM",) + QWEN_T2I_CARD[1:]),
    Preset("Qwen-Image-2512 - inpainting", qwen_inpaint,
           ("Repaint the masked part",) + QWEN_T2I_CARD[1:]),
    Preset("Qwen-Image-Edit-2511 - 1 image", lambda info: qwen_edit(info, 1), ("Edit one image",) + EDIT_CARD),
    Preset("Qwen-Image-Edit-2511 - 2 images", lambda info: qwen_edit(info, 2),
           ("Put image 2 into image 1",) + EDIT_CARD),
    Preset("Qwen-Image-Edit-2511 - Lightning", lambda info: qwen_edit(info, 1, lightning=True),
           ("Edit one image, 4 steps",) + EDIT_CARD[:2] + ("Lightning LoRA, Euler, CFG 1",)),
    Preset("Qwen-Image-Edit-2511 - inpainting", qwen_edit_inpaint, ("Repaint the masked part",) + EDIT_CARD),
    Preset("Z-Image-Turbo - 8 steps", z_image,
           ("Text to image, 1024 x 1024", "Z-Image-Turbo Q4_K (GGUF)", "Qwen3-4B Q4_K_M", "res_multistep, CFG 1")),
]
ORDER_FILE = HERE / "order.txt"


def card(preset: Preset, path: Path) -> None:
    """The template browser's thumbnail: a card naming the model, steps and sampler."""
    img = Image.new("RGB", (512, 512), "#1d2330")
    draw = ImageDraw.Draw(img)
    for y in range(512):  # a quiet vertical gradient
        draw.line([(0, y), (511, y)], fill=(29 + y // 24, 35 + y // 20, 48 + y // 12))
    draw.rectangle([0, 0, 511, 8], fill="#b58b2a")
    family, _, variant = preset.title.partition(" - ")
    # The browser lays its "Node graph" badge over the top left corner: the text starts below it.
    draw.text((32, 100), family, font=ImageFont.load_default(size=30), fill="#ffffff")
    draw.text((32, 140), variant, font=ImageFont.load_default(size=44), fill="#f0c05a")
    y = 225
    for line in preset.card:
        draw.text((32, y), line, font=ImageFont.load_default(size=24), fill="#d8dde8")
        y += 42
    draw.text((32, 470), "ComfyUI-QwenImage-GGUF", font=ImageFont.load_default(size=20), fill="#8a93a6")
    img.save(path, quality=90)


def main() -> None:
    info = object_info(__doc__.splitlines()[0])
    for preset in PRESETS:
        path = HERE / f"{preset.title}.json"
        path.write_text(json.dumps(preset.build(info), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        card(preset, path.with_suffix(".jpg"))
        print("wrote", path.relative_to(HERE.parent), "and its thumbnail")
    ORDER_FILE.write_text("".join(p.title + "\n" for p in PRESETS), encoding="utf-8")


if __name__ == "__main__":
    main()
