"""Converts the UI-format presets in workflows/ to ComfyUI's API format in workflows/api/.

Widget values are matched to input names the way ComfyUI's front end does it: in the order of the
node's widget inputs in /object_info, skipping the values of the front end's own controls (the
seed's control_after_generate, the image loader's upload button), which the API does not take.

    python workflows/to_api.py http://127.0.0.1:8188   # a ComfyUI with this package installed
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COLOR"}
FRONTEND_ONLY = {"MarkdownNote", "Note"}


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"


def widget_inputs(spec: dict, values: list) -> list[tuple[str, int, list]]:
    """(input name, number of values it takes in ``values``, its /object_info entry) for a node's
    ``widgets_values``, in the front end's widget order. A dynamic combo's chosen option brings its
    own widgets right after it, named "combo.input" as ComfyUI's API takes them."""
    out = []
    _widgets(spec, list(values), None, out)
    return out


def _widgets(spec: dict, values: list, prefix: str | None, out: list) -> None:
    for section in ("required", "optional"):
        names = spec.get("input_order", {}).get(section) or list(spec.get("input", {}).get(section, {}))
        for name in names:
            entry = spec["input"][section][name]
            kind, opts = entry[0], entry[1] if len(entry) > 1 else {}
            if not (isinstance(kind, list) or kind in WIDGET_TYPES or kind == DYNAMIC_COMBO):
                continue
            full = name if prefix is None else f"{prefix}.{name}"
            count = 1 + bool(opts.get("control_after_generate") or opts.get("image_upload"))
            out.append((full, count, entry))
            value = values[0] if values else None
            del values[:count]
            if kind == DYNAMIC_COMBO:
                option = next((o for o in opts["options"] if o["key"] == value), None)
                if option is not None:
                    _widgets({"input": option["inputs"]}, values, full, out)


def convert(ui: dict, info: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) == 4:
            continue
        inputs = {}
        values = list(node.get("widgets_values") or [])
        for name, count, _ in widget_inputs(info[node["type"]], values):
            if values:
                inputs[name] = values[0]
                values = values[count:]
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                _, src, slot, *_ = links[entry["link"]]
                inputs[entry["name"]] = [str(src), slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                # The title ComfyUI's own export writes: the node's, else its display name.
                                "_meta": {"title": node.get("title") or info[node["type"]].get("display_name")
                                          or node["type"]}}
    return api


def presets() -> list[Path]:
    return sorted(HERE.glob("*.json"))


def object_info(description: str) -> dict:
    """/object_info of the ComfyUI named on the command line (a script's whole argument handling)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8188",
                        help="a running ComfyUI with this package installed (default: %(default)s)")
    url = parser.parse_args().url.rstrip("/")
    try:
        with urllib.request.urlopen(url + "/object_info", timeout=60) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        parser.error(f"cannot read {url}/object_info ({e}): start ComfyUI with this package installed, "
                     "or give its address")


def main() -> None:
    info = object_info(__doc__.splitlines()[0])
    (HERE / "api").mkdir(exist_ok=True)
    for path in presets():
        api = convert(json.loads(path.read_text(encoding="utf-8")), info)
        out = HERE / "api" / path.name
        out.write_text(json.dumps(api, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print("wrote", out.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
