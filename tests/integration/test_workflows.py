"""The preset workflows: valid for real ComfyUI, their API twins in step, and each one running
end to end through ComfyUI's HTTP server (POST /prompt) with the tiny fixtures."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest
import torch
from PIL import Image

from comfy_env import REPO, requires_comfyui, run_script
from comfy_server import ComfyServer
from hf_mirror import Files, serve_manifest_files
import numpy as np
from gguf import GGMLQuantizationType as T

from comfy_env import comfyui_path
from loaders.convert.recipes import uniform_recipe
from tiny_models import (QWEN_IMAGE, Z_IMAGE, qwen_image_recipe, qwen_image_shapes, random_weights, write_lora,
                         write_model, z_image_shapes)
from tiny_text_encoders import QWEN3, QWEN25VL, VISION, write_llm, write_mmproj

sys.path.insert(0, str(REPO / "workflows"))
from to_api import DYNAMIC_COMBO, FRONTEND_ONLY, convert, presets, widget_inputs  # noqa: E402

pytestmark = requires_comfyui

WORKFLOWS = REPO / "workflows"
INPUT_IMAGES = sorted(p.name for p in (WORKFLOWS / "input").glob("*.png"))
MODEL_FOLDERS = {"diffusion_models", "text_encoders", "vae", "loras"}

# Real file name in the presets -> tiny fixture of the same kind.
FIXTURES = {
    "qwen-image-2512-Q4_K_M.gguf": "qwen-tiny.gguf",
    "qwen-image-edit-2511-Q4_K_M.gguf": "qwen-edit-tiny.gguf",
    "z_image_turbo-Q4_K.gguf": "z-image-tiny.gguf",
    "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf": "qwen25vl-tiny.gguf",
    "mmproj-F16.gguf": "mmproj-tiny.gguf",
    "Qwen3-4B-Instruct-2507-Q4_K_M.gguf": "qwen3-tiny.gguf",
    "qwen_image_vae.safetensors": "qwen-vae-tiny.safetensors",
    "ae.safetensors": "flux-vae-tiny.safetensors",
    "Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors": "tiny-lora.safetensors",
    "Qwen-Image-2512-Lightning-8steps-V1.0-bf16.safetensors": "tiny-lora.safetensors",
    "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors": "tiny-lora.safetensors",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf_models")
    for sub in MODEL_FOLDERS:
        (root / sub).mkdir()
    qwen = random_weights(qwen_image_shapes(**QWEN_IMAGE), 0)
    write_model(root / "diffusion_models" / "qwen-tiny.gguf", qwen, qwen_image_recipe())
    # Another quant of the presets' model, as the installer fetches on a large card: presets naming
    # qwen-image-2512-Q4_K_M.gguf must run on it.
    shutil.copy(root / "diffusion_models" / "qwen-tiny.gguf", root / "diffusion_models" / "qwen-image-2512-Q5_K_M.gguf")
    write_model(root / "diffusion_models" / "qwen-edit-tiny.gguf", qwen, qwen_image_recipe(),
                extra_tensors={"__index_timestep_zero__": np.zeros(0, np.float32)})
    write_lora(root / "loras" / "tiny-lora.safetensors", qwen)
    write_model(root / "diffusion_models" / "z-image-tiny.gguf", random_weights(z_image_shapes(**Z_IMAGE), 1),
                uniform_recipe(T.Q4_K), arch="lumina2")
    tokenizer = comfyui_path() / "comfy" / "text_encoders" / "qwen25_tokenizer"
    write_llm(root / "text_encoders" / "qwen25vl-tiny.gguf", "qwen2vl", QWEN25VL, tokenizer, None, head=True)
    write_mmproj(root / "text_encoders" / "mmproj-tiny.gguf", VISION, QWEN25VL["hidden"], None)
    write_llm(root / "text_encoders" / "qwen3-tiny.gguf", "qwen3", QWEN3, tokenizer, None)
    scripts = REPO / "tests" / "comfy_scripts"
    run_script(tmp_path_factory.mktemp("mk1"), root, scripts / "make_wan_vae.py", dim=16, seed=0,
               out=str(root / "vae" / "qwen-vae-tiny.safetensors"))
    run_script(tmp_path_factory.mktemp("mk2"), root, scripts / "make_flux_vae.py", ch=32, seed=0,
               out=str(root / "vae" / "flux-vae-tiny.safetensors"))
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("wf_server")
    with ComfyServer(work, models) as s:
        for name in INPUT_IMAGES:
            Image.open(WORKFLOWS / "input" / name).resize((64, 64)).save(work / "input" / name)
        s.object_info = s.get("/object_info")
        yield s


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


ORDER = (WORKFLOWS / "order.txt").read_text(encoding="utf-8").split("\n")[:-1]
T2I_20 = WORKFLOWS / "Qwen-Image-2512 - 20 steps.json"


def test_presets_exist_with_titles_order_and_thumbnails():
    assert ORDER[:3] == [f"Qwen-Image-2512 - {n} steps" for n in (20, 40, 60)]
    assert sorted(ORDER) == sorted(p.stem for p in presets()) and len(ORDER) == 14
    for title in ORDER:
        assert "_" not in title, "the template browser shows the file name as the title"
        assert (WORKFLOWS / "api" / f"{title}.json").exists()
        with Image.open(WORKFLOWS / f"{title}.jpg") as thumb:
            assert thumb.format == "JPEG" and thumb.size == (512, 512)


def check_value(node: dict, name: str, spec: list, value) -> str | None:
    kind, *rest = spec
    opts = rest[0] if rest else {}
    offered = {m["name"] for m in node.get("properties", {}).get("models", [])} | set(INPUT_IMAGES)
    options = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
    if kind == DYNAMIC_COMBO:
        options = [o["key"] for o in opts["options"]]
    if options is not None:
        return None if value in options or value in offered else f"{value!r} is not an option"
    if kind == "INT" and not (isinstance(value, int) and opts.get("min", -2**63) <= value <= opts.get("max", 2**64)):
        return f"{value!r} is not an INT in range"
    if kind == "FLOAT" and not (isinstance(value, (int, float)) and opts.get("min", -1e30) <= value <= opts.get("max", 1e30)):
        return f"{value!r} is not a FLOAT in range"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a BOOLEAN"
    if kind in ("STRING", "COLOR") and not isinstance(value, str):
        return f"{value!r} is not a STRING"
    return None


def test_bench_native_files_are_written_tensor_by_tensor_as_safetensors(tmp_path):
    # bench/full_size.py streams the 40 GB native files: what safetensors reads back is what was made.
    sys.path.insert(0, str(REPO / "bench"))
    from full_size import write_safetensors
    from safetensors.torch import load_file
    made = {}

    def make(name, shape):
        made[name] = torch.randn(shape, generator=torch.Generator().manual_seed(len(made)))
        return made[name]
    shapes = {"blocks.0.weight": (3, 5), "norm.weight": (7,), "__index_timestep_zero__": (0,), "conv": (2, 1, 3, 3)}
    write_safetensors(tmp_path / "m.safetensors", shapes, make)
    back = load_file(tmp_path / "m.safetensors")
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes
    for name, tensor in back.items():
        assert tensor.dtype == (torch.float32 if len(shapes[name]) <= 1 else torch.bfloat16)
        assert torch.equal(tensor, made[name].to(tensor.dtype))


@pytest.mark.parametrize("weight_dtype", ["native-bf16", "native-fp8"])
def test_bench_native_twins_of_the_api_presets_use_comfyuis_own_nodes_validly(server, weight_dtype):
    # bench/presets.py times each preset against the same graph through ComfyUI's own loaders: every
    # node of those twins is one ComfyUI has, linked within the twin, and the nodes put in ours' place
    # have their required inputs and valid options (file names aside: the native files exist only
    # where the bench writes them; the other nodes are the preset's, checked below).
    sys.path.insert(0, str(REPO / "bench"))
    import presets as bench
    info = server.object_info
    for path in sorted((WORKFLOWS / "api").glob("*.json")):
        if "Lightning" in path.stem:  # the bench installs no LoRA files
            continue
        twin, files, unet = bench.with_native(load(path), bench.NATIVE[weight_dtype])
        assert unet in files and len(files) == 3, (path.stem, files)
        for node_id, node in twin.items():
            kind = node["class_type"]
            assert kind in info and not kind.startswith("QwenImageGGUF"), (path.stem, kind)
            links = [v for v in node["inputs"].values() if isinstance(v, list)]
            assert all(link[0] in twin for link in links), (path.stem, node_id, links)
            if kind not in ("UNETLoader", "CLIPLoader", "VAELoader", "VAEDecode"):
                continue
            spec = info[kind]["input"]
            assert set(spec.get("required", {})) <= set(node["inputs"]), (path.stem, kind, node["inputs"])
            for name, value in node["inputs"].items():
                if isinstance(value, list):
                    continue
                wanted = spec.get("required", {}).get(name) or spec.get("optional", {}).get(name)
                assert wanted is not None, (path.stem, kind, name)
                if name not in bench.MODEL_KEYS:
                    assert check_value({}, name, wanted, value) is None, (path.stem, kind, name, value)


@pytest.mark.parametrize("path", presets(), ids=lambda p: p.stem)
def test_preset_is_valid_for_comfyui(server, path):
    ui = load(path)
    info = server.object_info
    problems = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert not ui.get("definitions"), "presets are flat graphs, without subgraphs"
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        if node["type"] not in info:
            problems.append(f"node {node['id']}: unknown type {node['type']}")
            continue
        spec = info[node["type"]]
        values = list(node["widgets_values"])
        for name, count, entry in widget_inputs(spec, values):
            error = check_value(node, name, entry, values[0])
            if error:
                problems.append(f"{node['type']}.{name}: {error}")
            values = values[count:]
        for model in node["properties"].get("models", []):
            if not (model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
                    and model["directory"] in MODEL_FOLDERS):
                problems.append(f"{node['type']}: bad models entry {model}")
        files = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith((".gguf", ".safetensors"))]
        missing = set(files) - {m["name"] for m in node["properties"].get("models", [])}
        if missing:
            problems.append(f"{node['type']}: no download entry for {missing}")
    for link_id, src, slot, dst, dst_slot, kind in ui["links"]:
        out_type = info[nodes[src]["type"]]["output"][slot]
        dst_node = nodes[dst]
        in_name = dst_node["inputs"][dst_slot]["name"]
        spec = info[dst_node["type"]]["input"]
        in_type = (spec.get("required", {}) | spec.get("optional", {}))[in_name][0]
        if not (out_type == kind == in_type or in_type == "*"):
            problems.append(f"link {link_id}: {out_type} -> {kind} -> {dst_node['type']}.{in_name} ({in_type})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", presets(), ids=lambda p: p.stem)
def test_api_twin_in_step(server, path):
    twin = WORKFLOWS / "api" / path.name
    assert twin.exists(), f"run: python workflows/to_api.py <ComfyUI URL> (missing {twin.name})"
    assert load(twin) == convert(load(path), server.object_info), "API twin is stale: run workflows/to_api.py"


def test_presets_in_template_browser(server):
    listed = server.get("/workflow_templates")
    module, ours = next((k, v) for k, v in listed.items() if "QwenImage-GGUF" in k)
    assert {p.stem for p in presets()} <= set(ours)
    for title in ORDER:  # the card's thumbnail, where the front end asks for it
        url = f"{server.url}/api/workflow_templates/{module}/{urllib.parse.quote(title)}.jpg"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"
    status = server.get("/qwen_gguf/models")
    # The front end orders the presets under the key the package's status names (its folder's name,
    # which ComfyUI-Manager may make lowercase).
    assert status["presets"] == ORDER and status["package"] == module


def shrink(api: dict, keep: set[str] = frozenset()) -> dict:
    """The preset with the tiny fixtures (but the names in ``keep``), small images and few steps,
    runnable on a CPU."""
    api = copy.deepcopy(api)
    for node_id, node in api.items():
        inputs = node["inputs"]
        for key, value in inputs.items():
            if isinstance(value, str) and value in FIXTURES and value not in keep:
                inputs[key] = FIXTURES[value]
        if node["class_type"] == "EmptySD3LatentImage":
            inputs.update(width=64, height=64)
        if node["class_type"] == "LatentUpscale":
            inputs.update(width=96, height=96)
        if node["class_type"] == "TextGenerate":
            inputs["max_length"] = 8
        if node["class_type"] == "KSampler":
            inputs["steps"] = {20: 2, 40: 3, 60: 4}.get(inputs["steps"], 2)
        if node["class_type"] == "FluxKontextImageScale":
            api[node_id] = {"class_type": "ImageScale", "inputs": {"image": inputs["image"], "upscale_method": "area",
                                                                   "width": 64, "height": 64, "crop": "disabled"}}
    return api


@pytest.mark.parametrize("path", presets(), ids=lambda p: p.stem)
def test_preset_runs_over_http(server, path):
    api = shrink(load(WORKFLOWS / "api" / path.name))
    entry = server.run(api)
    assert "rejected" not in entry, entry
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    saved = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert saved, entry["outputs"]
    for img in saved:
        image = Image.open(server.workdir / "output" / img.get("subfolder", "") / img["filename"])
        assert image.size[1] >= 64
    if "steps compared" in path.stem:
        assert image.size[0] >= 3 * 64, "three images side by side"
    if "written out" in path.stem:
        texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
        assert texts and all(isinstance(t, str) and t.strip() for t in texts), entry["outputs"]
    if "two stages" in path.stem:
        assert image.size == (96, 96), "the second stage samples the enlarged latent"
    if "inpainting" in path.stem:
        source = np.asarray(Image.open(server.workdir / "input" / "qwen_inpaint_input.png").convert("RGBA"), np.int16)
        out = np.asarray(image.convert("RGB"), np.int16)
        keep, repaint = source[..., 3] == 255, source[..., 3] == 0
        assert keep.any() and repaint.any()
        assert np.abs(out[keep] - source[..., :3][keep]).max() <= 1, "pixels outside the mask are the original's"
        assert np.abs(out[repaint] - source[..., :3][repaint]).mean() > 5, "the masked part was sampled"


def test_edit_inputs_ship_with_the_package():
    # The package copies workflows/input into ComfyUI's input folder at start-up.
    for path in presets():
        for node in load(path)["nodes"]:
            if node["type"] == "LoadImage":
                assert node["widgets_values"][0] in INPUT_IMAGES


# --- in a real browser: ComfyUI's own front end, served by the real server --------------------------

ARTIFACTS = REPO / "tests" / "artifacts"


def browser_missing_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "headless Chromium is not installed (apt-get install chromium chromium-driver)"
    return None


def ui_for_fixtures(ui: dict, keep: set[str] = frozenset()) -> dict:
    """The UI preset pointing at the tiny fixtures (widgets and download entries; but the names in
    ``keep``), small and quick."""
    ui = copy.deepcopy(ui)
    names = {k: v for k, v in FIXTURES.items() if k not in keep}
    for node in ui["nodes"]:
        values = node.get("widgets_values") or []
        node["widgets_values"] = [names.get(v, v) if isinstance(v, str) else v for v in values]
        for model in node.get("properties", {}).get("models", []):
            model["name"] = names.get(model["name"], model["name"])
        if node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [64, 64]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 2
    return ui


@pytest.fixture(scope="module")
def browser_factory(tmp_path_factory):
    """Opens ComfyUI's front end of a server in headless Chromium (closed at the end of the module)."""
    reason = browser_missing_reason()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    drivers = []

    def open_page(server):
        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--window-size=1600,1000",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
            options.add_argument(flag)
        options.binary_location = shutil.which("chromium")
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        drivers.append(driver)
        driver.set_script_timeout(120)
        driver.get(server.url)
        deadline = time.time() + 120
        while time.time() < deadline and not driver.execute_script("return !!(window.app && window.app.graph)"):
            time.sleep(1)
        assert driver.execute_script("return !!(window.app && window.app.graph)"), "the front end did not start"
        time.sleep(3)
        close_dialogs(driver)  # a new user's first visit opens the template browser
        ARTIFACTS.mkdir(exist_ok=True)
        return driver

    yield open_page
    for driver in drivers:
        driver.quit()


@pytest.fixture(scope="module")
def browser(server, browser_factory):
    return browser_factory(server)


DIALOGS = "[role=dialog], .p-dialog, .p-dialog-mask, .comfy-modal, .p-toast-message-error"


def visible_dialogs(driver) -> list[str]:
    return driver.execute_script(
        f"return [...document.querySelectorAll('{DIALOGS}')]"
        ".filter(e => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden')"
        ".map(e => e.innerText.slice(0, 300))")


def close_dialogs(driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    for _ in range(3):
        if not visible_dialogs(driver):
            return
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()
        time.sleep(0.5)
    assert not visible_dialogs(driver), visible_dialogs(driver)


def load_in_browser(driver, ui: dict) -> str:
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.app.loadGraphData(arguments[0]).then(() => done('ok'), e => done('error: ' + e));", ui)


@pytest.mark.parametrize("path", presets(), ids=lambda p: p.stem)
def test_preset_loads_in_the_browser(browser, path):
    assert load_in_browser(browser, ui_for_fixtures(load(path))) == "ok"
    time.sleep(1.5)
    count = browser.execute_script("return window.app.graph.nodes.length")
    assert count == len(load(path)["nodes"])
    browser.save_screenshot(str(ARTIFACTS / f"{path.stem}.png"))
    dialogs = visible_dialogs(browser)
    assert not dialogs, dialogs
    body = browser.execute_script("return document.body.innerText").lower()
    assert "missing node" not in body and "missing models" not in body
    assert not layout_problems(browser), layout_problems(browser)


LAYOUT_JS = """
const graph = window.app.graph, canvas = window.app.canvas, el = canvas.canvas;
const rect = (b) => ({x: b[0], y: b[1], w: b[2], h: b[3]});
const nodes = graph.nodes.map(n => ({id: n.id, type: n.title || n.type, ...rect(n.boundingRect)}));
const box = el.getBoundingClientRect();
const groups = graph.groups.map(g => {
  const b = g.boundingRect ?? g._bounding;
  const th = g.titleHeight ?? 34;
  const [cx, cy] = canvas.ds.convertOffsetToCanvas([b[0] + Math.min(b[2], 200) / 2, b[1] + th / 2]);
  const x = box.left + cx / (window.devicePixelRatio || 1), y = box.top + cy / (window.devicePixelRatio || 1);
  const hit = document.elementFromPoint(x, y);
  return {title: g.title, x, y, onCanvas: hit === el, ...rect(b)};
});
return {nodes, groups};
"""


# Each group's title and box, and the title's width as the canvas draws it (its font size, the
# group's padding either side).
GROUPS_JS = """
const ctx = document.createElement('canvas').getContext('2d');
return window.app.graph.groups.map(g => {
    const size = g.font_size ?? 24;
    ctx.font = `${size}px Arial`;
    return [g.title, ...(g.boundingRect ?? g._bounding), ctx.measureText(g.title).width + size / 2];
});
"""


def layout_problems(driver) -> list[str]:
    """Nodes whose boxes (title bar included) overlap or stick out of their group, and group titles
    that are wider than their group or that the saved view leaves off the canvas or under the front
    end's own panels."""
    found = driver.execute_script(LAYOUT_JS)
    problems = []
    nodes = found["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            dx = min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"])
            dy = min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"])
            if dx > 0 and dy > 0:
                problems.append(f"{a['type']} and {b['type']} overlap by {dx:.0f} x {dy:.0f} px")
    problems += [f"group title {g['title']!r} is not visible at ({g['x']:.0f}, {g['y']:.0f})"
                 for g in found["groups"] if not g["onCanvas"]]
    for g in driver.execute_script(GROUPS_JS):
        title, gx, gy, gw, gh, title_w = g
        if title_w > gw:
            problems.append(f"group title {title!r} is wider than its group ({title_w:.0f} > {gw:.0f} px)")
        for n in nodes:
            dx = min(n["x"] + n["w"], gx + gw) - max(n["x"], gx)
            dy = min(n["y"] + n["h"], gy + gh) - max(n["y"], gy)
            if dx > 0 and dy > 0 and (dx < n["w"] - 1 or dy < n["h"] - 1):
                problems.append(f"{n['type']} sticks out of group {title!r}")
    return problems


def test_template_browser_lists_the_presets_in_order(browser):
    # As a user meets it: the Templates dialog, this package's entry under Extensions.
    browser.execute_script("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    try:
        time.sleep(2)
        # Cards load their thumbnail when scrolled into view, which takes a while on a loaded CI machine:
        # scroll the pane round, counting each of ours loaded.
        deadline, images = time.time() + 120, 0
        while time.time() < deadline:
            text = browser.execute_script("return document.querySelector('[role=dialog]').innerText")
            if f"Showing {len(ORDER)} of {len(ORDER)}" not in text:  # our entry is not chosen (yet)
                browser.execute_script("[...document.querySelectorAll('[role=dialog] span')]"
                                       ".find(e => e.innerText === 'ComfyUI-QwenImage-GGUF').click()")
                time.sleep(1)
                continue
            # Counted from here on: only our cards are shown (thumbnails of others seen before do not count).
            images = browser.execute_script(
                "const seen = window.__qgThumbs = window.__qgThumbs || new Set();"
                "const imgs = [...document.querySelectorAll('[role=dialog] img')];"
                "imgs.filter(i => i.complete && i.naturalWidth === 512).forEach(i => seen.add(i.src));"
                "let pane = imgs[0];"  # the cards' own scrolling pane (not the side bar's)
                "while (pane && !(pane.scrollHeight > pane.clientHeight + 8"
                " && /auto|scroll/.test(getComputedStyle(pane).overflowY))) pane = pane.parentElement;"
                "if (pane) pane.scrollTop = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 8"
                " ? 0 : pane.scrollTop + 300;"  # round and round until every card has been seen loaded
                "return seen.size")
            if images == len(ORDER):
                break
            time.sleep(0.5)
        browser.save_screenshot(str(ARTIFACTS / "template_browser.png"))
        shown = [line for line in text.splitlines() if line in ORDER]
        assert shown == ORDER, text
        assert images == len(ORDER), "every card shows its thumbnail"
    finally:
        close_dialogs(browser)


def test_a_missing_model_file_is_named_with_where_to_get_it(server):
    # The preset as shipped: none of its real files (nor another quant of its model) is on this server.
    api = load(WORKFLOWS / "api" / "Z-Image-Turbo - 8 steps.json")
    answer = server.post("/prompt", {"prompt": api, "client_id": "missing"})
    errors = {api[node]["class_type"]: json.dumps(e) for node, e in answer.get("node_errors", {}).items()}
    for loader in ("QwenImageGGUFUnetLoader", "QwenImageGGUFClipLoader", "QwenImageGGUFVAELoader"):
        assert loader in errors, answer
        assert "download it with the 'Download' button" in errors[loader], errors
        assert "install.sh --models z-image-turbo" in errors[loader], errors
    # Both text-encoder files missing: the one message (ComfyUI shows it at each input) names both inputs.
    api = load(WORKFLOWS / "api" / "Qwen-Image-2512 - 20 steps.json")
    clip = next(node for node in api.values() if node["class_type"] == "QwenImageGGUFClipLoader")["inputs"]
    answer = server.post("/prompt", {"prompt": api, "client_id": "missing"})
    message = json.dumps(answer["node_errors"])
    assert f"clip_name: {clip['clip_name']}" in message and f"mmproj_name: {clip['mmproj_name']}" in message, message
    # A file of the user's own (not in the manifest): the message names the folders it was looked for in.
    unet = next(node for node in api.values() if node["class_type"] == "QwenImageGGUFUnetLoader")["inputs"]
    unet["unet_name"] = "my-finetune-Q4_K_M.gguf"
    message = json.dumps(server.post("/prompt", {"prompt": api, "client_id": "missing"})["node_errors"])
    assert "my-finetune-Q4_K_M.gguf is not in ComfyUI's model folders for this input" in message, message
    assert "diffusion_models" in message, message


def test_example_images_are_provided_at_start_up_and_a_users_own_kept(models, tmp_path):
    own = tmp_path / "input" / INPUT_IMAGES[0]
    own.parent.mkdir()
    own.write_bytes(b"the user's own picture")
    with ComfyServer(tmp_path, models):
        pass
    assert own.read_bytes() == b"the user's own picture"
    for name in INPUT_IMAGES[1:]:
        assert (tmp_path / "input" / name).read_bytes() == (WORKFLOWS / "input" / name).read_bytes()


def test_preset_naming_another_installed_quant_runs(server):
    # qwen-image-2512-Q4_K_M.gguf is not installed here, its Q5_K_M is: POST /prompt must take it.
    api = shrink(load(WORKFLOWS / "api" / T2I_20.name), keep={"qwen-image-2512-Q4_K_M.gguf"})
    entry = server.run(api)
    assert "rejected" not in entry, entry
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert "qwen-image-2512-Q4_K_M.gguf is not installed; using qwen-image-2512-Q5_K_M.gguf" in server.server_log()


def test_preset_naming_another_installed_quant_opens_without_a_missing_model(browser):
    ui = ui_for_fixtures(load(T2I_20), keep={"qwen-image-2512-Q4_K_M.gguf"})
    assert load_in_browser(browser, ui) == "ok"
    time.sleep(1.5)
    value = browser.execute_script(
        "return window.app.graph.nodes.find(n => n.type === 'QwenImageGGUFUnetLoader').widgets[0].value")
    assert value == "qwen-image-2512-Q5_K_M.gguf"
    assert not visible_dialogs(browser), visible_dialogs(browser)
    body = browser.execute_script("return document.body.innerText").lower()
    assert "missing models" not in body and "model files this workflow needs" not in body, body[-1500:]


def test_the_save_node_can_be_placed_from_the_front_end(browser):
    # Not in any preset: placed as a user places it (from the node library), with its widgets and input.
    found = browser.execute_script(
        "const n = LiteGraph.createNode('QwenImageGGUFSave'); window.app.graph.add(n);"
        "const out = {widgets: n.widgets.map(w => [w.name, w.value]), inputs: n.inputs.filter(i => !i.widget).map(i => i.type),"
        " title: n.title}; window.app.graph.remove(n); return out")
    assert found["title"] == "Save model as GGUF (Qwen-Image / Z-Image)", found
    assert found["inputs"] == ["MODEL"], found
    assert found["widgets"] == [["type", "Q4_K_M"], ["filename", "qwen-image-custom"], ["overwrite", False],
                                ["importance_matrix", "none"]], found
    assert not visible_dialogs(browser), visible_dialogs(browser)


def test_the_importance_matrix_nodes_can_be_placed_and_linked_from_the_front_end(browser):
    # The collector's matrix output links to the saver's input: their custom type matches in the page.
    found = browser.execute_script(
        "const c = LiteGraph.createNode('QwenImageGGUFCollectImportance'); window.app.graph.add(c);"
        "const s = LiteGraph.createNode('QwenImageGGUFSaveImportance'); window.app.graph.add(s);"
        "const link = c.connect(1, s, 0);"
        "const out = {collect: [c.title, c.inputs.map(i => i.type), c.outputs.map(o => o.type)],"
        " save: [s.title, s.inputs.filter(i => !i.widget).map(i => i.type), s.widgets.map(w => [w.name, w.value])],"
        " linked: !!link}; window.app.graph.remove(c); window.app.graph.remove(s); return out")
    assert found["collect"] == ["Collect Importance Matrix (GGUF)", ["MODEL"], ["MODEL", "QWEN_GGUF_IMPORTANCE"]], found
    assert found["save"] == ["Save Importance Matrix (GGUF)", ["QWEN_GGUF_IMPORTANCE", "LATENT"],
                             [["filename", "qwen-image"], ["replace", False]]], found
    assert found["linked"], found
    assert not visible_dialogs(browser), visible_dialogs(browser)


def test_queue_from_the_page_produces_an_image(browser, server):
    before = set(server.get("/history"))
    assert load_in_browser(browser, ui_for_fixtures(load(T2I_20))) == "ok"
    answer = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.app.queuePrompt(0, 1).then(r => done('queued'), e => done('error: ' + e));")
    assert answer == "queued"
    deadline = time.time() + 300
    while time.time() < deadline:
        new = {k: v for k, v in server.get("/history").items() if k not in before}
        done = [v for v in new.values() if v.get("status", {}).get("completed")]
        if done:
            images = [i for out in done[0]["outputs"].values() for i in out.get("images", [])]
            assert images and (server.workdir / "output" / images[0]["filename"]).exists()
            browser.save_screenshot(str(ARTIFACTS / "queued_from_page.png"))
            return
        errors = [v for v in new.values() if v.get("status", {}).get("status_str") == "error"]
        assert not errors, json.dumps(errors[0]["status"])[:2000]
        time.sleep(1)
    raise AssertionError("the queued prompt did not finish")


# --- missing models: downloaded from the front end's panel, from a local stand-in for Hugging Face ----

PANEL_FILES = ("qwen-image-2512-Q4_K_M.gguf", "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf", "mmproj-F16.gguf",
               "qwen_image_vae.safetensors")


@pytest.fixture(scope="module")
def mirror(models):
    srv = Files()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    real = json.loads((REPO / "install" / "models.json").read_text())
    contents = {name: next(models.rglob(FIXTURES[name])).read_bytes() for name in PANEL_FILES}
    srv.manifest = serve_manifest_files(srv, real, contents)
    srv.contents = contents
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def empty_server(mirror, tmp_path_factory):
    """A ComfyUI with none of the files, its downloads going to the mirror."""
    work = tmp_path_factory.mktemp("dl_server")
    models = work / "models"
    for sub in MODEL_FOLDERS:
        (models / sub).mkdir(parents=True)
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps(mirror.manifest))
    with ComfyServer(work, models, env={"HF_ENDPOINT": mirror.url, "QWEN_GGUF_MANIFEST": str(manifest)}) as s:
        yield s


@pytest.mark.parametrize("name", ["../../main.py", "/etc/passwd", "http://example.invalid/x.gguf",
                                  "not-in-the-manifest.gguf", "", None, ["mmproj-F16.gguf"]])
def test_download_route_takes_only_manifest_names(empty_server, name):
    answer = empty_server.post("/qwen_gguf/download", {"name": name})
    assert answer.get("http_error") == 400 and "manifest" in answer["error"]
    assert not [p for p in empty_server.models.rglob("*") if p.is_file()]


def test_missing_files_downloaded_from_the_panel(browser_factory, empty_server, mirror):
    dm = next(p for p in mirror.files if p.endswith("qwen-image-2512-Q4_K_M.gguf"))
    mirror.drop_after[dm] = len(mirror.contents["qwen-image-2512-Q4_K_M.gguf"]) // 3
    mirror.slow[dm] = 0.05
    driver = browser_factory(empty_server)
    assert load_in_browser(driver, load(T2I_20)) == "ok"
    time.sleep(2)
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#qwen-gguf-downloads .qg-row')].map(r => r.dataset.name)")
    assert sorted(rows) == sorted(PANEL_FILES)
    # The panel sits above ComfyUI's minimap and canvas controls in the bottom-right corner.
    on_screen = driver.execute_script("""
        const r = document.querySelector('#qwen-gguf-downloads').getBoundingClientRect();
        return r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth;""")
    assert on_screen, "the panel is within the window"
    corner = driver.execute_script("""
        const panel = document.querySelector('#qwen-gguf-downloads').getBoundingClientRect();
        const ids = ['minimap-container', 'zoom-controls-button', 'toggle-minimap-button'];
        return ids.flatMap(id => [...document.querySelectorAll(`[data-testid="${id}"]`)]).map(w => {
            const r = w.getBoundingClientRect();
            const visible = r.width > 0 && r.height > 0;
            const covered = visible && r.left < panel.right && panel.left < r.right && r.top < panel.bottom
                && panel.top < r.bottom;
            return [w.dataset.testid, visible, covered];
        });""")
    assert any(visible for _, visible, _ in corner), f"no minimap or canvas controls found: {corner}"
    assert not [name for name, _, covered in corner if covered], corner
    driver.execute_script("document.querySelector('#qwen-gguf-downloads .qg-all').click()")
    seen, deadline = set(), time.time() + 120
    while time.time() < deadline:
        states = driver.execute_script(
            "return [...document.querySelectorAll('#qwen-gguf-downloads .qg-state')].map(e => e.textContent)")
        seen.update(states)
        if states and all(s == "installed" for s in states):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"downloads did not finish: {states}")
    driver.save_screenshot(str(ARTIFACTS / "downloads_done.png"))
    assert any("/s, " in s and " left" in s for s in seen), seen  # size, speed and time left shown
    ranges = [rng for p, rng in mirror.requests if p == dm and rng]
    assert ranges, "the dropped download resumed with a Range request"
    for name in PANEL_FILES:
        assert next(empty_server.models.rglob(name)).read_bytes() == mirror.contents[name]
    deadline = time.time() + 30  # the panel refreshes the file lists after showing "installed"
    while time.time() < deadline:
        options = driver.execute_script(
            "return window.app.graph.nodes.find(n => n.type === 'QwenImageGGUFUnetLoader').widgets[0].options.values")
        if "qwen-image-2512-Q4_K_M.gguf" in options:
            break
        time.sleep(0.5)
    assert "qwen-image-2512-Q4_K_M.gguf" in options, "the loader's list refreshed"
    api = shrink(load(WORKFLOWS / "api" / T2I_20.name), keep=set(PANEL_FILES))
    entry = empty_server.run(api)
    assert "rejected" not in entry and entry["status"]["status_str"] == "success", entry


# --- after install.sh, for each quant choice: every installed preset validates and runs -----------------

INSTALL_CHOICES = {"auto on a 24 GB card (Q5_K_M)": ["--models", "all", "--vram", "24"],
                   "--quant Q4_0": ["--models", "qwen-image-2512", "--quant", "Q4_0"],
                   "--models all --quant Q4_K_M": ["--models", "all", "--quant", "Q4_K_M"]}
SET_PRESETS = {"qwen-image-2512": "Qwen-Image-2512 ", "qwen-image-edit-2511": "Qwen-Image-Edit-2511 ",
               "z-image-turbo": "Z-Image-Turbo "}


@pytest.mark.parametrize("choice", INSTALL_CHOICES, ids=list(INSTALL_CHOICES))
def test_installed_presets_validate_for_every_quant_choice(models, checkout, browser_factory, tmp_path, choice):
    srv = Files()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        real = json.loads((REPO / "install" / "models.json").read_text())
        # Every file of the manifest served as the tiny fixture of its kind (every quant of a model alike).
        names = {e["file"] for s in real["sets"].values() for e in s["diffusion_model"]["quants"].values()}
        names |= {e["file"] for e in real["files"].values()}
        kind = {n: next((v for k, v in FIXTURES.items() if k.split("-Q")[0] == n.split("-Q")[0]), FIXTURES.get(n))
                for n in names}
        contents = {n: next(models.rglob(kind[n])).read_bytes() for n in names if kind[n]}
        manifest = tmp_path / "models.json"
        manifest.write_text(json.dumps(serve_manifest_files(srv, real, contents)))
        comfy = tmp_path / "ComfyUI"
        (comfy / "custom_nodes").mkdir(parents=True)
        (comfy / "main.py").touch()
        r = subprocess.run(["bash", str(checkout / "install.sh"), "--comfyui", str(comfy), "--python", sys.executable,
                            "--skip-gpu-check", "--no-start", "--manifest", str(manifest),
                            *INSTALL_CHOICES[choice]], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "HF_ENDPOINT": srv.url})
        assert r.returncode == 0, r.stderr + r.stdout
    finally:
        srv.shutdown()
    installed = {p.name for p in (comfy / "models").rglob("*") if p.is_file()}
    sets = INSTALL_CHOICES[choice][1].split(",")
    prefixes = tuple(SET_PRESETS.values()) if sets == ["all"] else tuple(SET_PRESETS[s] for s in sets)
    with ComfyServer(tmp_path / "server", comfy / "models") as server:
        for path in [p for p in presets() if p.stem.startswith(prefixes)]:
            api = shrink(load(WORKFLOWS / "api" / path.name), keep=set(FIXTURES))
            answer = server.post("/prompt", {"prompt": api, "client_id": "validate"})
            assert "prompt_id" in answer and not answer.get("node_errors"), (path.stem, installed, answer)
        server.post("/queue", {"clear": True})
        server.post("/interrupt", {})
        first = shrink(load(WORKFLOWS / "api" / T2I_20.name), keep=set(FIXTURES))
        entry = server.run(first)
        assert "rejected" not in entry and entry["status"]["status_str"] == "success", entry
        # The same presets, as they are, in the front end: no missing model, no red node, no panel.
        driver = browser_factory(server)
        for path in [p for p in presets() if p.stem.startswith(prefixes)]:
            assert load_in_browser(driver, load(path)) == "ok"
            time.sleep(1.5)
            assert not visible_dialogs(driver), (path.stem, visible_dialogs(driver))
            body = driver.execute_script("return document.body.innerText").lower()
            assert "missing models" not in body and "model files this workflow needs" not in body, path.stem
            values = driver.execute_script(
                "return window.app.graph.nodes.flatMap(n => (n.widgets || []).filter(w => w.type === 'combo')"
                ".map(w => [w.name, w.value, (w.options.values || []).includes(w.value)]))")
            assert all(ok for _, _, ok in values), (path.stem, [v for v in values if not v[2]])
