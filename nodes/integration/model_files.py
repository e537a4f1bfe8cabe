"""The presets' files inside ComfyUI: which installed model file a loader uses, the routes behind
the front end's download panel (web/model_downloads.js), and the example images the edit and
inpainting presets load.

A preset names one quant of each diffusion model (Q4_K_M); the installer may have fetched another
(Q5_K_M on a large card). A loader given a manifest file that is not installed uses the best
installed quant of the same model, and says so, so presets run whatever quant the user has.

The download routes fetch only files named in the manifest, into their model folder, under their
manifest name: a client names a file, never a URL or a path.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import folder_paths

from ...loaders.downloads import DEFAULT_ENDPOINT, MANIFEST as MANIFEST_PATH, DownloadError, ModelFile, Progress, \
    fetch, load_manifest, partial_bytes
from .folders import listing_key

log = logging.getLogger(__name__)

# QWEN_GGUF_MANIFEST: another manifest (a company mirror's file list; the tests' local mirror).
MANIFEST = load_manifest(os.environ.get("QWEN_GGUF_MANIFEST") or MANIFEST_PATH)
PRESETS_DIR = Path(__file__).resolve().parents[2] / "workflows"


def _directory(f: ModelFile) -> Path:
    """Where ComfyUI looks first for this kind of file (models/<folder>, or a default set in
    extra_model_paths.yaml)."""
    return Path(folder_paths.get_folder_paths(f.folder)[0])


def resolve(folder_key: str, name: str) -> str | None:
    """The installed file a loader should open for ``name``: itself, or (for a diffusion model of the
    manifest) the largest installed quant of the same model; None when neither is there."""
    installed = folder_paths.get_filename_list(folder_key)
    if name in installed:
        return name
    kin = [f for f in MANIFEST.quant_family(name) if f.name in installed]
    if not kin:
        return None
    return max(kin, key=lambda f: f.size or 0).name


def full_path(folder_key: str, name: str) -> str:
    """The path a loader opens, logging a substitution; a clear error when the file is missing."""
    chosen = resolve(folder_key, name)
    if chosen is None:
        raise FileNotFoundError(missing_message(name, folder_key))
    if chosen != name:
        log.info("%s is not installed; using %s, another quant of the same model", name, chosen)
    return folder_paths.get_full_path_or_raise(folder_key, chosen)


def missing_message(name: str, folder_key: str) -> str:
    f = MANIFEST.files.get(name)
    if f is None:
        folders = ", ".join(folder_paths.get_folder_paths(folder_key))
        return f"{name} is not in ComfyUI's model folders for this input ({folders})"
    sets = ",".join(n for n, s in MANIFEST.sets.items() if name in {g.name for g in (*s.quants.values(), *s.files)})
    return (f"{name} is not in models/{f.folder}: download it with the 'Download' button of the Qwen-Image GGUF "
            f"panel (it opens when a workflow names a missing file), or with install.sh --models {sets}")


def validate(folder_key: str, name: str, substitute: bool = True) -> bool | str:
    """For a node's validate_inputs: True, or the reason the prompt cannot run. ``substitute``: another
    installed quant of a manifest diffusion model will do (the loader then opens it, ``full_path``)."""
    if substitute:
        found = resolve(folder_key, name) is not None
    else:
        found = name in folder_paths.get_filename_list(folder_key)
    return True if found else missing_message(name, folder_key)


def provide_example_inputs() -> None:
    """The presets' example images (workflows/input) in ComfyUI's input folder, where their LoadImage
    nodes look: copied at start-up where missing, never over a file of the same name, so the edit and
    inpainting presets run however the package was installed (install.sh, ComfyUI-Manager, a clone)."""
    target = Path(folder_paths.get_input_directory())
    for image in sorted((PRESETS_DIR / "input").glob("*.png")):
        if (target / image.name).exists():
            continue
        try:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target / image.name)
        except OSError as e:
            log.warning("Qwen-Image GGUF: could not copy the example image %s into %s (%s): the edit and "
                        "inpainting presets need it there", image.name, target, e)


# --- the download panel's routes ---------------------------------------------------------------------

class Downloads:
    """Downloads running in threads (one per file), their progress read by the front end."""

    def __init__(self):
        self.jobs: dict[str, Progress] = {}
        self.cancel: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def start(self, f: ModelFile) -> Progress:
        with self.lock:
            job = self.jobs.get(f.name)
            if job is not None and job.state in ("running", "verifying"):
                return job
            job = self.jobs[f.name] = Progress(f.name, f.size)
            self.cancel[f.name] = threading.Event()
        threading.Thread(target=self._run, args=(f, job), daemon=True, name=f"download {f.name}").start()
        return job

    def _run(self, f: ModelFile, job: Progress) -> None:
        def report(p: Progress) -> None:
            job.done, job.total, job.state, job.message = p.done, p.total, p.state, p.message
            job.started, job.resumed_from = p.started, p.resumed_from
        try:
            path = fetch(f, _directory(f), os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT,
                         os.environ.get("HF_TOKEN") or None, report, self.cancel[f.name].is_set)
            log.info("downloaded %s to %s (%s)", f.name, path, job.message)
        except DownloadError as e:
            job.state, job.message = "error", str(e)
            log.warning("download of %s failed: %s", f.name, e)
        except Exception as e:  # a disk error and the like: shown in the panel, not lost in a thread
            job.state, job.message = "error", f"{f.name}: {type(e).__name__}: {e}"
            log.exception("download of %s failed", f.name)


DOWNLOADS = Downloads()


def status() -> dict:
    files = []
    for f in MANIFEST.files.values():
        chosen = resolve(listing_key(f.folder), f.name)
        job = DOWNLOADS.jobs.get(f.name)
        files.append({"name": f.name, "folder": f.folder, "size": f.size, "url": f.url(DEFAULT_ENDPOINT),
                      "installed": chosen == f.name, "partial": partial_bytes(f, _directory(f)),
                      "substitute": chosen if chosen != f.name else None,
                      "job": job.as_dict() if job else None})
    # The package's folder under custom_nodes (not resolved: a symlink's name) is its key in ComfyUI's
    # /workflow_templates, whatever the install named it (ComfyUI-Manager uses the lowercase registry id).
    return {"files": files, "presets": preset_order(), "package": Path(__file__).parents[2].name}


def preset_order() -> list[str]:
    """The presets in the order the template browser should list them (see workflows/build_presets.py)."""
    order_file = PRESETS_DIR / "order.txt"
    return [line.strip() for line in order_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def register_routes() -> None:
    """Adds the panel's routes to ComfyUI's server (none when running without one, as in scripts)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    routes = PromptServer.instance.routes

    @routes.get("/qwen_gguf/models")
    async def models(request):
        return web.json_response(status())

    @routes.post("/qwen_gguf/download")
    async def download(request):
        name = await _requested_name(request)
        f = MANIFEST.files.get(name) if isinstance(name, str) else None
        if f is None:
            error = (f"{name!r} is not a file of this package's model manifest" if isinstance(name, str) else
                     'the body must be JSON {"name": FILE}, FILE a file of this package\'s model manifest')
            return web.json_response({"error": error}, status=400)
        return web.json_response(DOWNLOADS.start(f).as_dict())

    @routes.post("/qwen_gguf/cancel")
    async def cancel(request):
        name = await _requested_name(request)
        event = DOWNLOADS.cancel.get(name) if isinstance(name, str) else None
        if event is None:
            return web.json_response({"error": f"no download of {name!r}"}, status=400)
        event.set()
        return web.json_response({"cancelled": name})


async def _requested_name(request):
    try:
        body = await request.json()
    except ValueError:
        return None
    return body.get("name") if isinstance(body, dict) else None
