"""A local stand-in for Hugging Face's file server: /<repo>/resolve/main/<path> with Range support
and the X-Linked-Etag (the file's sha256) that Hugging Face sends for LFS files; it can drop a
connection part-way or serve wrong bytes."""

from __future__ import annotations

import copy
import hashlib
import http.server
import threading
import time

import pytest


class Files(http.server.ThreadingHTTPServer):
    """Serves /<repo>/resolve/main/<file> with Range support; can drop a connection or serve wrong bytes."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}    # path -> bytes sent before the first response breaks
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        self.publish_sha256 = True
        self.slow: dict[str, float] = {}          # path -> seconds to wait per 64 KiB sent

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
        published = hashlib.sha256(data).hexdigest()
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
        if srv.publish_sha256:
            self.send_header("X-Linked-Etag", f'"{published}"')
        self.end_headers()
        if head:
            return
        cut = srv.drop_after.pop(path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        delay = srv.slow.get(path)
        if delay is None:
            self.wfile.write(body)
            return
        for i in range(0, len(body), 1 << 16):
            self.wfile.write(body[i:i + (1 << 16)])
            self.wfile.flush()
            # Read again as it goes, so that a test can hold a download and then let it finish.
            waited = 0.0
            while waited < srv.slow.get(path, 0.0):
                time.sleep(0.05)
                waited += 0.05


def serve_manifest_files(srv: Files, manifest: dict, contents: dict[str, bytes]) -> dict:
    """Serve ``contents`` (file name -> bytes) where the manifest's entries point, and return a copy
    of the manifest whose sizes are those of the served bytes (every other file left out)."""
    m = copy.deepcopy(manifest)
    for s in m["sets"].values():
        dm = s["diffusion_model"]
        dm["quants"] = {q: e for q, e in dm["quants"].items() if e["file"] in contents}
        for e in dm["quants"].values():
            e["size"] = len(contents[e["file"]])
            srv.files[f"/{dm['repo']}/resolve/main/{e.get('path', e['file'])}"] = contents[e["file"]]
    for e in m["files"].values():
        if e["file"] in contents:
            e["size"] = len(contents[e["file"]])
            srv.files[f"/{e['repo']}/resolve/main/{e.get('path', e['file'])}"] = contents[e["file"]]
    m["sets"] = {k: s for k, s in m["sets"].items() if s["diffusion_model"]["quants"]}
    return m


@pytest.fixture
def files():
    srv = Files()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


