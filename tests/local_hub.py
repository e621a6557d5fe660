"""A stand-in for the Hugging Face hub on 127.0.0.1, for download tests without the internet.

It speaks the part of the hub API huggingface_hub uses to pull files: `GET /api/models/REPO/revision/REV`
(with `blobs=true`: siblings with size, git blob id and LFS sha256/size), and `HEAD`/`GET`
`/REPO/resolve/REV/PATH` with `ETag`, `X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`,
`Accept-Ranges` and `Range` answers (206 + `Content-Range`). `*.safetensors` files are served as LFS
files. Faults are switched on per test: a connection dropped part-way through a file, bytes that differ
from the listed checksum, 401/403 for the files of a gated repo, a slow transfer (to cancel in the middle).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Repo:
    folder: Path
    commit: str = ""
    # As the hub does for a gated repo: the listing is public, files need a token with access
    # (`token`); without it they get `gated_status` (401 without a token, 403 with another one).
    gated_status: int | None = None
    token: str | None = None

    def files(self) -> dict[str, Path]:
        return {str(p.relative_to(self.folder)): p for p in sorted(self.folder.rglob("*")) if p.is_file()}


@dataclass
class Faults:
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the drop (once)
    corrupt: set[str] = field(default_factory=set)  # paths whose bytes are served altered
    chunk_delay_s: float = 0.0  # sleep after each 64 KiB sent


class LocalHub:
    """`with LocalHub({"org/name": folder}) as hub:` serves the folders at `hub.url`."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = {repo_id: Repo(Path(folder)) for repo_id, folder in repos.items()}
        for repo in self.repos.values():
            digest = hashlib.sha1()
            for name, path in repo.files().items():
                digest.update(name.encode() + path.read_bytes())
            repo.commit = digest.hexdigest()
        self.faults = Faults()
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def bytes_sent_ranges(self, path: str) -> list[str | None]:
        return [rng for method, p, rng in self.log if method == "GET" and p.endswith("/" + path)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._answer(head=False)

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def _answer(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.log.append((self.command, path, self.headers.get("Range")))
                if path.startswith("/api/models/"):
                    return self._model_info(path[len("/api/models/") :])
                if "/resolve/" in path:
                    repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                    _, _, filename = rest.partition("/")
                    return self._resolve(repo_id, filename, head)
                self._error(404, "EntryNotFound")

            def _repo(self, repo_id: str, files: bool = False) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound")
                    return None
                allowed = repo.token and self.headers.get("Authorization") == f"Bearer {repo.token}"
                if files and repo.gated_status and not allowed:
                    self._error(repo.gated_status, "GatedRepo", "Access to model is restricted.")
                    return None
                return repo

            def _model_info(self, rest: str) -> None:
                repo_id = rest.split("/revision/")[0]
                repo = self._repo(repo_id)
                if repo is None:
                    return
                siblings = []
                for name, file in repo.files().items():
                    data = file.read_bytes()
                    sibling = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
                    if name.endswith(".safetensors"):
                        sibling["lfs"] = {
                            "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "pointerSize": 134,
                        }
                    siblings.append(sibling)
                body = json.dumps(
                    {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "siblings": siblings}
                )
                self._send(200, body.encode(), {"Content-Type": "application/json"})

            def _resolve(self, repo_id: str, filename: str, head: bool) -> None:
                repo = self._repo(repo_id, files=True)
                if repo is None:
                    return
                file = repo.files().get(filename)
                if file is None:
                    return self._error(404, "EntryNotFound")
                data = file.read_bytes()
                etag = git_blob_id(data)
                headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
                if filename.endswith(".safetensors"):
                    headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                    headers["X-Linked-Size"] = str(len(data))
                if filename in hub.faults.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                requested = self.headers.get("Range")
                if requested and not head:
                    start = int(requested.split("=")[1].split("-")[0])
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                if head:
                    return self._send(200, b"", {**headers, "Content-Length": str(len(data))})
                self.send_response(206 if requested else 200)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                drop = hub.faults.drop_after.pop(filename, None)
                sent = 0
                while sent < len(body):
                    piece = body[sent : sent + 65536]
                    if drop is not None and sent + len(piece) > drop:
                        self.wfile.write(body[sent:drop])
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)  # mid-file, as a network failure
                        self.close_connection = True
                        return
                    self.wfile.write(piece)
                    sent += len(piece)
                    if hub.faults.chunk_delay_s:
                        time.sleep(hub.faults.chunk_delay_s)

            def _error(self, status: int, code: str, message: str = "") -> None:
                body = json.dumps({"error": message or code}).encode()
                headers = {"Content-Type": "application/json", "X-Error-Code": code}
                if message:
                    headers["X-Error-Message"] = message
                self._send(status, body, headers)

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                headers.setdefault("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        return Handler
