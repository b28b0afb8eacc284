"""Reading data where users keep it: local paths and file:// URLs, http(s):// URLs (urllib, no extra
dependency) and every other fsspec URL (s3://, gs://, hf://, memory://, ...) through fsspec and its backend.

HTTP reads go through `HTTPFile`: seekable (a seek is a Range request), retried from the byte reached when a
connection drops, and a response that ends before its Content-Length counts as a drop, never as a short file.
Credentials never travel in the URL (config_checks.credentials_in refuses such a path): each filesystem reads
its usual environment variables and files (s3fs: AWS_*, ~/.aws; gcsfs: GOOGLE_APPLICATION_CREDENTIALS;
huggingface_hub: HF_TOKEN, its login); http(s) reads ~/.netrc for the host.
"""

from __future__ import annotations

import base64
import html.parser
import http.client
import io
import netrc
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO

from difftrain.config_checks import CREDENTIALS_TEXT, credentials_in, redact
from difftrain.data import DataError

# fsspec protocol -> the package that implements it (fsspec raises ImportError without it)
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub",
            "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "sftp": "paramiko", "ssh": "paramiko"}
RETRIES = 4  # further attempts after a dropped connection, each from the byte reached
MAX_LIST_DEPTH = 16  # sub-folders followed when listing an http(s) folder


def scheme(spec: str) -> str:
    """The URL scheme of `spec` in lower case; '' for a plain path (a Windows drive letter is no scheme)."""
    head, sep, _ = spec.partition("://")
    return head.lower() if sep and len(head) > 1 and head.replace("+", "").replace("-", "").isalnum() else ""


def is_url(spec: str) -> bool:
    """Whether `spec` is read through the network or fsspec (any scheme but file://)."""
    return scheme(spec) not in ("", "file")


def is_http(spec: str) -> bool:
    return scheme(spec) in ("http", "https")


def local(spec: str) -> Path:
    """The local path of a plain path or file:// URL."""
    if scheme(spec) == "file":
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(spec).path))
    return Path(spec).expanduser()


def check_no_credentials(spec: str) -> None:
    if credentials_in(spec):
        raise DataError(f"'{redact(spec)}': {CREDENTIALS_TEXT}")


def join(base: str, rel: str) -> str:
    """`rel` (a / path) inside the folder `base` (a path or URL)."""
    if not is_url(base):
        return str(local(base) / rel)
    return base.rstrip("/") + "/" + (urllib.parse.quote(rel) if is_http(base) else rel)


def _fs(spec: str):
    """(fsspec filesystem, path inside it), or a DataError naming the package a protocol needs."""
    import fsspec

    name = scheme(spec)
    try:
        return fsspec.core.url_to_fs(spec)
    except ImportError:
        package = BACKENDS.get(name, f"the fsspec backend for {name}://")
        raise DataError(f"reading '{redact(spec)}' needs {package} (the fsspec filesystem for {name}://), "
                        f"which is not installed: pip install {package}") from None
    except ValueError as e:
        raise DataError(f"'{redact(spec)}': fsspec does not know the protocol {name}:// ({e})") from None


def _fs_error(spec: str, e: Exception) -> DataError:
    if isinstance(e, FileNotFoundError):
        return DataError(f"'{redact(spec)}' not found")
    return DataError(f"cannot read '{redact(spec)}': {type(e).__name__}: {e}")


def open_binary(spec: str) -> IO[bytes]:
    """`spec` opened for reading bytes, seekable: a local file, an HTTPFile or an fsspec file."""
    check_no_credentials(spec)
    if not is_url(spec):
        try:
            return open(local(spec), "rb")
        except OSError as e:
            raise DataError(f"cannot read '{spec}': {e.strerror or e}") from None
    if is_http(spec):
        return io.BufferedReader(HTTPFile(spec), buffer_size=1 << 20)
    fs, path = _fs(spec)
    try:
        return fs.open(path, "rb")
    except Exception as e:  # each backend raises its own errors: named, with the URL
        raise _fs_error(spec, e) from None


def read_bytes(spec: str) -> bytes:
    with open_binary(spec) as f:
        try:
            return f.read()
        except DataError:
            raise
        except Exception as e:  # a backend's network error, a local read error
            raise _fs_error(spec, e) from None


def is_file(spec: str) -> bool:
    check_no_credentials(spec)
    if not is_url(spec):
        return local(spec).is_file()
    if is_http(spec):
        try:
            with _http_open(spec, method="HEAD"):
                return True
        except DataError:  # 404, 403: no such file
            return False
        except ConnectionError as e:
            raise DataError(f"cannot reach '{redact(spec)}': {e}") from None
    fs, path = _fs(spec)
    try:
        return fs.isfile(path)
    except Exception as e:
        raise _fs_error(spec, e) from None


def list_files(spec: str, suffixes: tuple[str, ...] | set[str]) -> list[str]:
    """The files under the folder `spec` whose names end in one of `suffixes` (lower case), as sorted
    / paths relative to it; sub-folders included. An http(s) folder is read from its HTML listing."""
    check_no_credentials(spec)
    if not is_url(spec):
        root = local(spec)
        if not root.is_dir():
            raise DataError(f"folder '{spec}' does not exist or is not a folder")
        found = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    elif is_http(spec):
        found = _list_http(spec.rstrip("/") + "/", "", 0)
    else:
        fs, path = _fs(spec)
        try:
            if not fs.isdir(path):
                raise DataError(f"'{redact(spec)}' is not a folder that can be listed (missing, private or unreachable)")
            path = path.rstrip("/")
            found = [p[len(path):].lstrip("/") for p in fs.find(path)]
        except DataError:
            raise
        except Exception as e:
            raise _fs_error(spec, e) from None
    return sorted(f for f in found if any(f.lower().endswith(s) for s in suffixes))


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs.extend(v for k, v in attrs if k == "href" and v)


def _list_http(base: str, prefix: str, depth: int) -> list[str]:
    """Files below `base` + `prefix` linked from its listing page (links that lead elsewhere are ignored)."""
    url = base + urllib.parse.quote(prefix)
    page = read_bytes(url).decode("utf-8", "replace")
    links = _Links()
    links.feed(page)
    found = []
    for href in dict.fromkeys(links.hrefs):
        target = urllib.parse.urljoin(url, href).split("#", 1)[0]
        if "?" in target or not target.startswith(url) or target == url:
            continue  # sorting links, parent folders, other sites
        rel = urllib.parse.unquote(target[len(base):])
        if rel.endswith("/"):
            if depth + 1 < MAX_LIST_DEPTH:
                found.extend(_list_http(base, rel, depth + 1))
        else:
            found.append(rel)
    return found


def _auth_header(url: str) -> dict[str, str]:
    """Basic authentication from ~/.netrc for the URL's host, if it lists one."""
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        entry = netrc.netrc().authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return {}
    if not entry:
        return {}
    token = base64.b64encode(f"{entry[0]}:{entry[2]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _http_open(url: str, start: int = 0, method: str = "GET", timeout: float = 60):
    """The response to one request; a DataError for a client error (404, 403), a ConnectionError
    (retried by the caller) for a server error or a network failure."""
    headers = {"User-Agent": "difftrain", **_auth_header(url)}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method), timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise ConnectionError(f"HTTP {e.code} {e.reason}") from None
        raise DataError(f"'{redact(url)}': HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ConnectionError(f"{e.reason}") from None


class HTTPFile(io.RawIOBase):
    """A read-only seekable file over http(s). Sequential reads share one response; a seek, or a dropped
    connection (retried RETRIES times, from the byte reached), opens a Range request at the position."""

    def __init__(self, url: str, retries: int = RETRIES, timeout: float = 60):
        self.url, self.retries, self.timeout = url, retries, timeout
        self.pos, self.size = 0, None
        self._resp, self._resp_pos = None, -1
        self._retrying(self._connect)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END and self.size is None:
            raise OSError(f"'{redact(self.url)}': the server sent no length, so the end cannot be sought")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size or 0}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _connect(self) -> None:
        self._drop()
        resp = _http_open(self.url, self.pos, timeout=self.timeout)
        if self.pos and resp.status != 206:
            resp.close()
            raise DataError(f"'{redact(self.url)}': the server ignores byte ranges (HTTP Range), which reading from "
                            f"byte {self.pos} needs (a seek, or a retry after a dropped connection); serve the files "
                            f"with a server that supports Range requests")
        if resp.status == 206:  # Content-Range: bytes START-END/TOTAL
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        else:
            total = resp.headers.get("Content-Length")
        if self.size is None and total and total.isdigit():
            self.size = int(total)
        self._resp, self._resp_pos = resp, self.pos

    def _drop(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp, self._resp_pos = None, -1

    def _retrying(self, fn):
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (ConnectionError, http.client.HTTPException, OSError) as e:  # timeouts and resets are OSErrors
                last = e
                self._drop()
                if attempt < self.retries:
                    time.sleep(min(0.05 * 2**attempt, 2.0))
        of = f" of {self.size}" if self.size is not None else ""
        raise DataError(f"reading '{redact(self.url)}' failed at byte {self.pos}{of} after {self.retries + 1} "
                        f"attempts: {type(last).__name__}: {last}")

    def _read_once(self, b) -> int:
        if self._resp is None or self._resp_pos != self.pos:
            self._connect()
        n = self._resp.readinto(b)
        if n == 0:  # http.client returns 0, not an error, when a connection closes before Content-Length
            if self.size is None or self.pos >= self.size:
                return 0
            raise ConnectionError(f"the connection closed at byte {self.pos} of {self.size}")
        self.pos += n
        self._resp_pos = self.pos
        return n

    def readinto(self, b) -> int:
        if self.size is not None and self.pos >= self.size or len(b) == 0:
            return 0
        return self._retrying(lambda: self._read_once(b))

    def close(self) -> None:
        self._drop()
        super().close()


__all__ = ["HTTPFile", "is_file", "is_http", "is_url", "join", "list_files", "local", "open_binary", "read_bytes",
           "scheme"]
