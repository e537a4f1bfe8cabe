"""The model files of our presets: the manifest, which quant each model set gets, and downloads
that resume, check size and sha256, and report progress.

One implementation serves ``install.sh`` (run as a script, standard library only, before the
package's requirements exist) and the download route of the ComfyUI front end. Only files named in
the manifest can be fetched, always into their model folder under their manifest name.

A download is checked against its size and sha256: the sha256 pinned in the manifest, else the one
Hugging Face publishes for the file (its LFS object id, the ``X-Linked-Etag`` of the resolve URL),
else the size alone.

    python loaders/downloads.py --manifest install/models.json --models-dir ComfyUI/models \\
        --sets qwen-image-2512 [--quant Q4_K_M] [--vram 24] [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

DEFAULT_ENDPOINT = "https://huggingface.co"
MANIFEST = Path(__file__).resolve().parent.parent / "install" / "models.json"
CHUNK = 1 << 20
TRIES = 5
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(RuntimeError):
    """A model file cannot be planned or fetched; the message names the file and what to do."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry  # True when running the same download again can succeed


@dataclass(frozen=True)
class ModelFile:
    name: str      # file name in the model folder, as the presets name it
    folder: str    # ComfyUI model folder: diffusion_models, text_encoders, vae, loras
    repo: str
    path: str      # path inside the repository
    size: int | None = None
    sha256: str | None = None

    def url(self, endpoint: str) -> str:
        return f"{endpoint.rstrip('/')}/{self.repo}/resolve/main/{self.path}"


@dataclass(frozen=True)
class ModelSet:
    name: str
    description: str
    quants: dict[str, ModelFile]  # the diffusion model, one file per quant
    preset_quant: str             # the quant the presets name
    files: tuple[ModelFile, ...]  # text encoder, mmproj, VAE


@dataclass
class Manifest:
    sets: dict[str, ModelSet]
    vram_choices: list[tuple[float, str, str]]  # (min GB, quant, why), largest first
    files: dict[str, ModelFile] = field(init=False)  # every file any set names, by file name

    def __post_init__(self):
        self.files = {}
        for s in self.sets.values():
            for f in (*s.quants.values(), *s.files):
                self.files.setdefault(f.name, f)

    def quant_family(self, name: str) -> list[ModelFile]:
        """The diffusion-model files of the set whose quants include ``name`` (empty if none)."""
        for s in self.sets.values():
            if name in {f.name for f in s.quants.values()}:
                return list(s.quants.values())
        return []


def load_manifest(path: str | os.PathLike = MANIFEST) -> Manifest:
    data = json.loads(Path(path).read_text(encoding="utf-8"))

    def entry(d: dict, name: str) -> ModelFile:
        return ModelFile(name=name, folder=d["folder"], repo=d["repo"], path=d.get("path", name),
                         size=d.get("size"), sha256=(d.get("sha256") or None))

    shared = {key: entry(d, d["file"]) for key, d in data["files"].items()}
    sets = {}
    for name, s in data["sets"].items():
        dm = s["diffusion_model"]
        quants = {q: entry({**dm, **d}, d["file"]) for q, d in dm["quants"].items()}
        sets[name] = ModelSet(name, s.get("description", ""), quants, s.get("preset_quant", next(iter(quants))),
                              tuple(shared[k] for k in s["files"]))
    choices = sorted(((float(c["min_gb"]), c["quant"], c["why"]) for c in data.get("vram_choices", [])),
                     key=lambda c: -c[0])
    return Manifest(sets, choices)


# --- which files -------------------------------------------------------------------------------------

def _same_kind(asked: str, offered: str) -> bool:
    """Q4_K_M and Q4_K_S fall back to Q4_K (a set that names its K-quant mix without a suffix)."""
    return offered == re.sub(r"_[SML]$", "", asked)


def choose_quant(s: ModelSet, asked: str | None, choices: list[tuple[float, str, str]],
                 vram_gb: float | None) -> tuple[str, str]:
    """(quant, why) for one set: ``asked`` if the set offers it (or its K-quant of the same bits),
    else from the VRAM."""
    if asked:
        if asked in s.quants:
            return asked, "as asked with --quant"
        kin = [q for q in s.quants if _same_kind(asked, q)]
        if kin:
            return kin[0], f"{s.name} has no {asked}; {kin[0]} is its file of the same bits"
        return "", ""
    gb = vram_gb or 0.0
    for min_gb, quant, why in choices:
        if gb >= min_gb and quant in s.quants:
            return quant, why
    return s.preset_quant, "the quant the presets use"


def plan(manifest: Manifest, set_names: list[str], quant: str | None = None,
         vram_gb: float | None = None) -> tuple[list[ModelFile], list[str]]:
    """The files to have for these sets, each once, and one line per set saying which quant and why."""
    quant = quant.upper() if quant else quant  # quant names are upper case: q4_k_m means Q4_K_M
    unknown = [n for n in set_names if n not in manifest.sets]
    if unknown:
        raise DownloadError(f"unknown model set(s) {', '.join(unknown)}: choose from "
                            f"{', '.join(manifest.sets)} or all")
    files: dict[str, ModelFile] = {}
    notes, refused = [], []
    for name in set_names:
        s = manifest.sets[name]
        chosen, why = choose_quant(s, quant, manifest.vram_choices, vram_gb)
        if not chosen:
            refused.append(name)
            continue
        vram = f"{vram_gb:g} GB VRAM" if vram_gb is not None else "VRAM unknown"
        notes.append(f"{name}: diffusion model {chosen} ({why}; {vram})")
        for f in (s.quants[chosen], *s.files):
            files.setdefault(f.name, f)
    if refused:
        offers = "; ".join(f"{n}: {', '.join(manifest.sets[n].quants)}" for n in set_names)
        raise DownloadError(f"quant {quant} is not offered by {', '.join(refused)}. Offered: {offers}")
    return list(files.values()), notes


def resolve_sets(arg: str, manifest: Manifest) -> list[str]:
    return list(manifest.sets) if arg == "all" else [s.strip() for s in arg.split(",") if s.strip()]


# --- fetching ------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """What a running download has done, for a progress line or the front end."""
    name: str
    total: int | None
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    resumed_from: int = 0
    state: str = "running"  # running, verifying, done, error
    message: str = ""

    @property
    def speed(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self.resumed_from) / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if not self.total or self.speed <= 0:
            return None
        return max(0.0, (self.total - self.done) / self.speed)

    def as_dict(self) -> dict:
        return {"name": self.name, "total": self.total, "done": self.done, "speed": self.speed, "eta": self.eta,
                "state": self.state, "message": self.message}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def human_time(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def describe(p: Progress) -> str:
    total = f" / {human_bytes(p.total)} ({100 * p.done / p.total:.0f}%)" if p.total else ""
    return f"{p.name}: {human_bytes(p.done)}{total}, {human_bytes(p.speed)}/s, {human_time(p.eta)} left"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _headers(token: str | None) -> dict[str, str]:
    return {"User-Agent": "ComfyUI-QwenImage-GGUF", **({"Authorization": f"Bearer {token}"} if token else {})}


def published_sha256(url: str, token: str | None) -> str | None:
    """The sha256 Hugging Face publishes for an LFS file: the X-Linked-Etag of its resolve URL
    (sent with the redirect to the file's storage, so the redirect is not followed)."""
    req = urllib.request.Request(url, method="HEAD", headers=_headers(token))
    try:
        resp = urllib.request.build_opener(_NoRedirect).open(req, timeout=30)
        headers = resp.headers
    except urllib.error.HTTPError as e:
        headers = e.headers
    except (urllib.error.URLError, OSError):
        return None
    etag = (headers.get("X-Linked-Etag") or "").strip('"').lower() if headers else ""
    return etag if _SHA256.match(etag) else None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK * 8), b""):
            h.update(chunk)
    return h.hexdigest()


def _http_fault(f: ModelFile, url: str, code: int) -> DownloadError:
    if code == 404:
        return DownloadError(f"{f.name}: not found at {url} (HTTP 404): the file was renamed or removed "
                             "upstream; the package's install/models.json needs updating")
    if code in (401, 403):
        return DownloadError(f"{f.name}: access denied at {url} (HTTP {code}): set HF_TOKEN to a Hugging Face "
                             "token that can read it")
    return DownloadError(f"{f.name}: the server answered HTTP {code} for {url}", retry=True)


def _stream(f: ModelFile, url: str, part: Path, token: str | None, progress: Progress,
            report: Callable[[Progress], None], cancelled: Callable[[], bool]) -> None:
    """One request: append to ``part`` from where it ends (HTTP Range)."""
    have = part.stat().st_size if part.exists() else 0
    headers = _headers(token)
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing after what we have: complete, or the remote file changed
            if f.size is None or have != f.size:
                if part.exists():  # emptied, not removed: the file is what _only_download_of locks
                    os.truncate(part, 0)
                raise DownloadError(f"{f.name}: the partial download does not fit the remote file", retry=True)
            return
        raise _http_fault(f, url, e.code) from None
    with resp:
        progress.message = ""  # a retry's "resuming" note ends once data flows again
        mode = "ab" if have and resp.status == 206 else "wb"
        progress.done = have if mode == "ab" else 0
        progress.resumed_from, progress.started = progress.done, time.monotonic()
        last = 0.0
        length = resp.headers.get("Content-Length")
        end = progress.done + int(length) if length and length.isdigit() else None
        with open(part, mode) as out:
            # read1 hands over what arrived before a dropped connection, so a resume loses nothing.
            while chunk := resp.read1(CHUNK):
                if cancelled():
                    raise DownloadError(f"{f.name}: cancelled")
                out.write(chunk)
                progress.done += len(chunk)
                if time.monotonic() - last > 0.5:
                    last = time.monotonic()
                    report(progress)
        if end is not None and progress.done < end:
            raise ConnectionError(f"the connection closed after {human_bytes(progress.done)} of {human_bytes(end)}")


def _gave_up(f: ModelFile, part: Path, tries: int, e: Exception) -> DownloadError:
    have = part.stat().st_size if part.exists() else 0
    kept = f"; the {human_bytes(have)} downloaded are kept" if have else ""
    return DownloadError(f"{f.name}: the download failed after {tries} tries ({e}){kept}", retry=True)


@contextlib.contextmanager
def _only_download_of(f: ModelFile, part: Path) -> Iterator[None]:
    """Held while ``part`` is written: a second download of the same file (another install.sh, or
    ComfyUI's panel beside it) would append to the same partial file and ruin both. The lock is on
    the partial file itself, which is therefore only ever emptied while held, never replaced, and
    renamed into place last. Where no advisory lock can be had (Windows, a network filesystem
    without locking) the download goes on without one."""
    try:
        import fcntl
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"{f.name}: another download of this file is running (a second install.sh, or "
                                "ComfyUI's download panel); wait for it to finish") from None
        except OSError:
            pass
        try:
            yield
        finally:
            # The partial file made only to be locked, if it is still ours and nothing was written.
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size == 0 and os.stat(part).st_ino == os.fstat(fd).st_ino:
                    part.unlink()
    finally:
        os.close(fd)


def fetch(f: ModelFile, directory: str | os.PathLike, endpoint: str = DEFAULT_ENDPOINT, token: str | None = None,
          report: Callable[[Progress], None] = lambda p: None, cancelled: Callable[[], bool] = lambda: False,
          tries: int = TRIES) -> Path:
    """Download ``f`` into ``directory`` (its model folder), resuming a partial ``.part`` file; the
    file appears under its name only once its size and sha256 are checked."""
    dest = Path(directory) / f.name
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _only_download_of(f, part):
        if present(f, directory):  # another download finished it since this one was asked for
            done = Progress(f.name, f.size, done=f.size or 0)
            done.state, done.message = "done", "already in place"
            report(done)
            return dest
        return _fetch(f, dest, part, endpoint, token, report, cancelled, tries)


def _fetch(f: ModelFile, dest: Path, part: Path, endpoint: str, token: str | None,
           report: Callable[[Progress], None], cancelled: Callable[[], bool], tries: int) -> Path:
    url = f.url(endpoint)
    progress = Progress(f.name, f.size)
    expected_sha = f.sha256 or published_sha256(url, token)
    for attempt in range(1, tries + 1):
        try:
            _stream(f, url, part, token, progress, report, cancelled)
            break
        except DownloadError as e:
            if not e.retry or attempt == tries or cancelled():
                raise
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):  # no retry brings a name that does not resolve
                raise DownloadError(f"{f.name}: cannot reach {urllib.parse.urlsplit(url).hostname} (the name "
                                    f"does not resolve: {e.reason.strerror}): check the machine's network, or set "
                                    "HF_ENDPOINT to a mirror it can reach", retry=True) from None
            if attempt == tries or cancelled():
                raise _gave_up(f, part, tries, e) from None
        except (http.client.HTTPException, OSError) as e:
            if attempt == tries or cancelled():
                raise _gave_up(f, part, tries, e) from None
        progress.message = f"connection broke; resuming (try {attempt + 1} of {tries})"
        report(progress)
        time.sleep(min(2 ** attempt / 4, 5))
    got = part.stat().st_size
    if f.size is not None and got != f.size:
        part.unlink()
        raise DownloadError(f"{f.name}: downloaded {got:,} bytes but {f.size:,} were expected; the partial file "
                            "was removed", retry=True)
    # No sha256 to check against: a gated repository without a token, a mirror without Hugging Face's
    # headers, or a network blip during the lookup. Said, not silent.
    unchecked = (("size checked; " if f.size is not None else "")
                 + "no published sha256 could be read to check it against")
    progress.state, progress.message = "verifying", "checking sha256" if expected_sha else unchecked
    report(progress)
    if expected_sha and sha256_of(part) != expected_sha:
        part.unlink()
        raise DownloadError(f"{f.name}: sha256 does not match {'the manifest' if f.sha256 else 'the published one'} "
                            "(corrupted download); the file was removed", retry=True)
    os.replace(part, dest)
    progress.state, progress.message = "done", "sha256 checked" if expected_sha else unchecked
    report(progress)
    return dest


def present(f: ModelFile, directory: str | os.PathLike) -> bool:
    """The file is in place at its manifest size."""
    dest = Path(directory) / f.name
    return dest.is_file() and (f.size is None or dest.stat().st_size == f.size)


def partial_bytes(f: ModelFile, directory: str | os.PathLike) -> int:
    part = Path(directory) / (f.name + ".part")
    return part.stat().st_size if part.is_file() else 0


# --- the installer's command line --------------------------------------------------------------------

def _progress_printer(stream=sys.stdout) -> Callable[[Progress], None]:
    tty = stream.isatty()
    state = {"last": 0.0}

    def report(p: Progress) -> None:
        now = time.monotonic()
        if p.state == "running" and not p.message and not tty and now - state["last"] < 10:
            return
        state["last"] = now
        line = describe(p) + (f" - {p.message}" if p.message else "")
        if tty and p.state == "running" and not p.message:
            stream.write("\r\033[K" + line)
        else:
            stream.write(("\r\033[K" if tty else "") + line + "\n")
        stream.flush()
    return report


def _needed(files: list[ModelFile], models_dir: Path) -> Iterator[tuple[str, str]]:
    """(name, why) of each file to download: missing, or in place with a sha256 other than the pinned one."""
    for f in files:
        if not present(f, models_dir / f.folder):
            yield f.name, "missing"
        elif f.sha256 and sha256_of(models_dir / f.folder / f.name) != f.sha256:
            yield f.name, "sha256 differs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Download the model files of the presets' model sets.")
    ap.add_argument("--manifest", default=str(MANIFEST))
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--sets", default="qwen-image-2512")
    ap.add_argument("--quant")
    ap.add_argument("--vram", type=float)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help="only check the sets, the quant and the free disk, silently unless they fail (files "
                         "in place at their size count as present; nothing is hashed or downloaded)")
    args = ap.parse_args(argv)
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    token = os.environ.get("HF_TOKEN") or None
    models_dir = Path(args.models_dir)
    try:
        manifest = load_manifest(args.manifest)
        files, notes = plan(manifest, resolve_sets(args.sets, manifest), args.quant, args.vram)
    except (DownloadError, OSError, ValueError, KeyError) as e:
        print(f"install.sh: {e}", file=sys.stderr)
        return 2
    if args.check:
        needed = {f.name: "missing" for f in files if not present(f, models_dir / f.folder)}
    else:
        for note in notes:
            print(f"==> {note}")
        needed = dict(_needed(files, models_dir))
        for f in files:
            if f.name not in needed:
                print(f"==> {f.name}: already present")
            elif needed[f.name] == "sha256 differs":
                print(f"==> {f.name}: present but its sha256 differs; downloading it again")
                if not args.dry_run:
                    (models_dir / f.folder / f.name).unlink()
    to_fetch = [f for f in files if f.name in needed]
    missing = sum(max(0, (f.size or 0) - partial_bytes(f, models_dir / f.folder)) for f in to_fetch)
    probe = models_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    # The manifest lists no size for some files (the Lightning LoRAs): the disk check cannot count them.
    unsized = ", ".join(f.name for f in to_fetch if not f.size)
    if not args.check:
        extra = f" and files of unlisted size ({unsized})" if unsized else ""
        print(f"==> Model files still to download: {human_bytes(missing)}{extra}; free disk: {human_bytes(free)}")
    if missing > free:
        print(f"install.sh: not enough disk space: {human_bytes(missing)} needed in {models_dir} but only "
              f"{human_bytes(free)} free; free some space or choose fewer --models", file=sys.stderr)
        return 1
    if args.check:
        return 0
    report = _progress_printer()
    for f in to_fetch:
        url = f.url(endpoint)
        if args.dry_run:
            print(f"[dry-run] download {url} -> {models_dir / f.folder / f.name}"
                  f"{f' ({human_bytes(f.size)})' if f.size else ''}")
            continue
        resume = partial_bytes(f, models_dir / f.folder)
        print(f"==> {f.name}: downloading{f' (resuming at {human_bytes(resume)})' if resume else ''} from {url}")
        try:
            fetch(f, models_dir / f.folder, endpoint, token, report)
        except DownloadError as e:
            kept = partial_bytes(f, models_dir / f.folder)
            again = f"; run install.sh again to {'resume' if kept else 'download it anew'}" if e.retry else ""
            print(f"install.sh: {e}{again}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            kept = partial_bytes(f, models_dir / f.folder)
            said = (f"the {human_bytes(kept)} of {f.name} downloaded so far are kept: run install.sh again to resume"
                    if kept else "run install.sh again to download the rest")
            print(f"\ninstall.sh: interrupted; {said}", file=sys.stderr)
            return 130
        print(f"==> {f.name}: done")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before any download: checking the sha256 of files in place takes minutes
        print("\ninstall.sh: interrupted; run install.sh again to go on", file=sys.stderr)
        sys.exit(130)
