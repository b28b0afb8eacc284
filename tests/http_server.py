"""A small HTTP server on 127.0.0.1 for the remote-data tests and bench/streaming.py: serves a folder with
HTML listings, Range requests (unless `ranges` is off), and connections dropped on purpose mid-file."""

from __future__ import annotations

import html
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Behaviour:
    """What the server does: `drops[path]` more responses of that file are cut after half their bytes
    (Content-Length promised in full); `requests` records (path, Range header) of every GET, `auth` the
    Authorization header of every request."""

    ranges: bool = True
    drops: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)


def _handler(root: Path, behaviour: Behaviour):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 20  # a client that stops reading cannot hold a thread for long

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
            target = (root / path.lstrip("/")).resolve()
            behaviour.auth.append(self.headers.get("Authorization"))
            if body:
                behaviour.requests.append((path, self.headers.get("Range")))
            if not target.is_relative_to(root.resolve()) or not target.exists():
                return self._send(404, b"not found", body)
            if target.is_dir():
                if not path.endswith("/"):
                    self.send_response(301)
                    self.send_header("Location", path + "/")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                links = ['<a href="../">parent</a>', '<a href="?C=N;O=D">sort</a>']
                for p in sorted(target.iterdir()):
                    name = p.name + ("/" if p.is_dir() else "")
                    links.append(f'<a href="{urllib.parse.quote(name)}">{html.escape(name)}</a>')
                return self._send(200, "<br>\n".join(links).encode(), body, "text/html")
            data = target.read_bytes()
            start = 0
            spec = self.headers.get("Range")
            if spec and behaviour.ranges and spec.startswith("bytes=") and spec.endswith("-"):
                start = int(spec[6:-1])
            chunk = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Accept-Ranges", "bytes" if behaviour.ranges else "none")
            self.end_headers()
            if not body:
                return
            if behaviour.drops.get(path, 0) > 0:
                behaviour.drops[path] -= 1
                self.wfile.write(chunk[: len(chunk) // 2])
                self.wfile.flush()
                self.close_connection = True  # the rest never comes
                return
            self.wfile.write(chunk)

        def _send(self, code: int, payload: bytes, body: bool, kind: str = "text/plain"):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler


@contextmanager
def serve(root: Path, behaviour: Behaviour | None = None) -> Iterator[tuple[str, Behaviour]]:
    """(base URL 'http://127.0.0.1:PORT', behaviour) of a server for `root`, shut down on exit."""
    behaviour = behaviour or Behaviour()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root), behaviour))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", behaviour
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
