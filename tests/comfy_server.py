"""A real ComfyUI HTTP server (main.py, on the CPU, on 127.0.0.1) with this package installed, for
tests that go through /object_info and POST /prompt as the front end and headless clients do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from comfy_env import PACKAGE_NAME, REPO, comfyui_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, workdir: Path, models: Path, extra_args: tuple[str, ...] = (), env: dict | None = None,
                 device_args: tuple[str, ...] = ("--cpu",)):
        self.workdir, self.models, self.env = workdir, models, env or {}
        self.device_args = device_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        custom_nodes = self.workdir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        link = custom_nodes / PACKAGE_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        for sub in ("input", "output", "user"):
            (self.workdir / sub).mkdir(exist_ok=True)
        folders = {k: str(self.models / k) for k in ("diffusion_models", "text_encoders", "vae", "loras")}
        config = self.workdir / "extra_model_paths.yaml"
        # is_default: these folders come first, so downloads from the UI land in them.
        config.write_text("test:\n  is_default: true\n" + "".join(f"  {k}: {v}\n" for k, v in folders.items())
                          + f"  custom_nodes: {custom_nodes}\n")
        self.log = open(self.workdir / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", *self.device_args, "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-api-nodes", "--extra-model-paths-config", str(config),
             "--input-directory", str(self.workdir / "input"), "--output-directory", str(self.workdir / "output"),
             "--user-directory", str(self.workdir / "user"), *self.extra_args],
            cwd=comfyui_path(), stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.server_log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within 180 s:\n{self.server_log()[-4000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def server_log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return {"http_error": e.code, **json.loads(e.read() or b"{}")}

    def run(self, prompt: dict, timeout: float = 600, poll: float = 0.5) -> dict:
        """POST /prompt, then wait for its /history entry (asked every ``poll`` seconds)."""
        answer = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        if "prompt_id" not in answer:
            return {"rejected": answer}
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{answer['prompt_id']}")
            entry = history.get(answer["prompt_id"])
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry
            time.sleep(poll)
        raise TimeoutError(f"prompt did not finish in {timeout} s:\n{self.server_log()[-3000:]}")
