"""The preset workflows: valid for real ComfyUI, their API twins in step, and each one running
end to end through ComfyUI's HTTP server (POST /prompt) with the tiny fixtures."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time

import pytest
from PIL import Image

from comfy_env import REPO, requires_comfyui, run_script
from comfy_server import ComfyServer
import numpy as np
from gguf import GGMLQuantizationType as T

from comfy_env import comfyui_path
from loaders.writer import uniform_recipe
from tiny_models import (QWEN_IMAGE, Z_IMAGE, qwen_image_recipe, qwen_image_shapes, random_weights, write_model,
                         z_image_shapes)
from tiny_text_encoders import QWEN3, QWEN25VL, VISION, write_llm, write_mmproj

sys.path.insert(0, str(REPO / "workflows"))
from to_api import FRONTEND_ONLY, convert, presets, widget_inputs  # noqa: E402

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
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf_models")
    for sub in MODEL_FOLDERS:
        (root / sub).mkdir()
    qwen = random_weights(qwen_image_shapes(**QWEN_IMAGE), 0)
    write_model(root / "diffusion_models" / "qwen-tiny.gguf", qwen, qwen_image_recipe())
    write_model(root / "diffusion_models" / "qwen-edit-tiny.gguf", qwen, qwen_image_recipe(),
                extra_tensors={"__index_timestep_zero__": np.zeros(1, np.float32)})
    write_model(root / "diffusion_models" / "z-image-tiny.gguf", random_weights(z_image_shapes(**Z_IMAGE), 1),
                uniform_recipe(T.Q4_K), arch="lumina2")
    tokenizer = comfyui_path() / "comfy" / "text_encoders" / "qwen25_tokenizer"
    write_llm(root / "text_encoders" / "qwen25vl-tiny.gguf", "qwen2vl", QWEN25VL, tokenizer, None)
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


def test_presets_exist():
    names = {p.stem for p in presets()}
    assert {"qwen_image_2512_t2i_20steps", "qwen_image_2512_t2i_40steps", "qwen_image_2512_t2i_60steps",
            "qwen_image_edit_2511_one_image", "qwen_image_edit_2511_two_images", "z_image_turbo",
            "qwen_image_2512_step_comparison"} <= names


def check_value(node: dict, name: str, spec: list, value) -> str | None:
    kind, *rest = spec
    opts = rest[0] if rest else {}
    offered = {m["name"] for m in node.get("properties", {}).get("models", [])} | set(INPUT_IMAGES)
    options = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
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
        for name, count in widget_inputs(spec):
            section = "required" if name in spec["input"]["required"] else "optional"
            error = check_value(node, name, spec["input"][section][name], values[0])
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
    ours = next(v for k, v in listed.items() if "QwenImage-GGUF" in k)
    assert {p.stem for p in presets()} <= set(ours)


def shrink(api: dict) -> dict:
    """The preset with the tiny fixtures, small images and few steps, runnable on a CPU."""
    api = copy.deepcopy(api)
    for node_id, node in api.items():
        inputs = node["inputs"]
        for key, value in inputs.items():
            if isinstance(value, str) and value in FIXTURES:
                inputs[key] = FIXTURES[value]
        if node["class_type"] == "EmptySD3LatentImage":
            inputs.update(width=64, height=64)
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
    if "step_comparison" in path.stem:
        assert image.size[0] >= 3 * 64, "three images side by side"


def test_edit_inputs_ship_with_the_package():
    # The install script copies workflows/input into ComfyUI's input folder.
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


def ui_for_fixtures(ui: dict) -> dict:
    """The UI preset pointing at the tiny fixtures (widgets and download entries), small and quick."""
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        values = node.get("widgets_values") or []
        node["widgets_values"] = [FIXTURES.get(v, v) if isinstance(v, str) else v for v in values]
        for model in node.get("properties", {}).get("models", []):
            model["name"] = FIXTURES.get(model["name"], model["name"])
        if node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [64, 64]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 2
    return ui


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    reason = browser_missing_reason()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(120)
    driver.get(server.url)
    deadline = time.time() + 120
    while time.time() < deadline and not driver.execute_script("return !!(window.app && window.app.graph)"):
        time.sleep(1)
    assert driver.execute_script("return !!(window.app && window.app.graph)"), "the front end did not start"
    time.sleep(3)
    close_dialogs(driver)  # a new user's first visit opens the template browser
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


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


def test_queue_from_the_page_produces_an_image(browser, server):
    before = set(server.get("/history"))
    assert load_in_browser(browser, ui_for_fixtures(load(WORKFLOWS / "qwen_image_2512_t2i_20steps.json"))) == "ok"
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
