"""Finding a real ComfyUI and running graphs through it (integration tests skip without one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_NAME = "ComfyUI-QwenImage-GGUF"


def comfyui_path() -> Path:
    """COMFYUI_PATH, else the ComfyUI this package is installed in, else ../ComfyUI (tests/run.sh
    sets COMFYUI_PATH, also to its copy of ../shared/ComfyUI)."""
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    if REPO.parent.name == "custom_nodes" and (REPO.parent.parent / "main.py").is_file():
        return REPO.parent.parent.resolve()
    return (REPO.parent / "ComfyUI").resolve()


def comfyui_missing_reason() -> str | None:
    path = comfyui_path()
    if not (path / "comfy" / "model_patcher.py").is_file():
        return f"no ComfyUI tree at {path} (set COMFYUI_PATH to a ComfyUI checkout to run integration tests)"
    try:
        import torchvision  # noqa: F401  (ComfyUI imports it at start-up)
        import comfy_kitchen  # noqa: F401
    except ImportError as e:
        return f"ComfyUI's requirements are not installed in this environment ({e})"
    return None


requires_comfyui = pytest.mark.skipif(comfyui_missing_reason() is not None,
                                      reason=comfyui_missing_reason() or "")


def run_prompts(workdir: Path, models: Path, prompts: list[dict], timeout: int = 900,
                args: list[str] | None = None, other_nodes: dict[str, Path] | None = None) -> list[dict]:
    """Run API-format prompts in a fresh ComfyUI process with this package installed as a custom node
    (started with ``args``: by default on the CPU), and ``other_nodes`` (name: folder) beside it."""
    results = _run(workdir, models, {"prompts": prompts, **({} if args is None else {"args": args})}, timeout,
                   other_nodes)
    if len([r for r in results if "index" in r]) != len(prompts):
        raise AssertionError(f"ComfyUI answered {len(results)} of {len(prompts)} prompts: {results}")
    return [r for r in results if "index" in r]


def run_script(workdir: Path, models: Path, script: Path, timeout: int = 900, **params) -> dict:
    """Run ``script``'s run(cfg) inside a started ComfyUI with this package loaded; returns its result."""
    results = _run(workdir, models, {"script": str(script), **params}, timeout)
    return next(r["script"] for r in results if "script" in r)


def _run(workdir: Path, models: Path, job: dict, timeout: int, other_nodes: dict[str, Path] | None = None) -> list[dict]:
    custom_nodes = workdir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    for name, target in ((PACKAGE_NAME, REPO), ("comfy_test_nodes", REPO / "tests" / "comfy_test_nodes"),
                         *(other_nodes or {}).items()):
        link = custom_nodes / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    output = workdir / "output"
    output.mkdir(exist_ok=True)
    config = workdir / "run.json"
    config.write_text(json.dumps({"comfyui": str(comfyui_path()), "custom_nodes": str(custom_nodes),
                                  "models": str(models), "output": str(output), **job}))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "comfy_runner.py"), str(config)],
                          capture_output=True, text=True, timeout=timeout)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        raise AssertionError(f"ComfyUI run failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    failed_loads = [r for r in results if "load_failed" in r]
    assert not failed_loads, f"custom nodes failed to load: {failed_loads}\n{proc.stderr[-8000:]}"
    return results
