"""Converts the UI-format presets in workflows/ to ComfyUI's API format in workflows/api/.

Widget values are matched to input names the way ComfyUI's front end does it: in the order of the
node's widget inputs in /object_info, skipping the values of the front end's own controls (the
seed's control_after_generate, the image loader's upload button), which the API does not take.

    python workflows/to_api.py http://127.0.0.1:8188   # a ComfyUI with this package installed
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COLOR"}
FRONTEND_ONLY = {"MarkdownNote", "Note"}


def widget_inputs(spec: dict) -> list[tuple[str, int]]:
    """(input name, number of values it takes in widgets_values) in the front end's widget order."""
    out = []
    for section in ("required", "optional"):
        for name in spec.get("input_order", {}).get(section, []):
            kind, *rest = spec["input"][section][name]
            opts = rest[0] if rest else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                out.append((name, 1 + bool(opts.get("control_after_generate") or opts.get("image_upload"))))
    return out


def convert(ui: dict, info: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) == 4:
            continue
        inputs = {}
        values = list(node.get("widgets_values") or [])
        for name, count in widget_inputs(info[node["type"]]):
            if values:
                inputs[name] = values[0]
                values = values[count:]
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                _, src, slot, *_ = links[entry["link"]]
                inputs[entry["name"]] = [str(src), slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return api


def presets() -> list[Path]:
    return sorted(HERE.glob("*.json"))


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8188"
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as r:
        info = json.loads(r.read())
    (HERE / "api").mkdir(exist_ok=True)
    for path in presets():
        api = convert(json.loads(path.read_text(encoding="utf-8")), info)
        out = HERE / "api" / path.name
        out.write_text(json.dumps(api, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print("wrote", out.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
