"""A small local Hugging Face Hub for tests: the part of the Hub API that `models pull` uses.

- ``GET /api/models/{repo}[/revision/{rev}]``: model info with ``sha`` (the resolved commit) and
  ``siblings`` (path, size, and ``lfs`` with SHA-256 for weight files).
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length`` headers; ``Range: bytes=N-`` answers 206 with the rest.
- Errors as the Hub sends them: a gated repo answers 401 with ``X-Error-Code: GatedRepo``; an unknown
  repo 404 ``RepoNotFound``, revision 404 ``RevisionNotFound``, file 404 ``EntryNotFound``.
- ``cut``: path -> how many of its next GETs are cut: the headers, then half the body (from the
  start of the file) or nothing (a resumed request), then the connection drops. The client resumes
  with a Range request.

``requests`` logs every request as ``(method, path, range header)``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".ckpt")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # commit -> {path: content}
    refs: dict[str, str]  # branch -> commit
    gated: bool = False


def commit_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: str, files: dict[str, bytes], *, branch: str = "main", gated: bool = False) -> str:
        """Commit ``files`` as the new head of ``branch``; returns the commit id."""
        r = self.repos.setdefault(repo, Repo({}, {}))
        r.gated = gated
        commit = commit_id(repo + json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())))
        r.commits[commit] = dict(files)
        r.refs[branch] = commit
        return commit

    def gets(self, path_part: str) -> list[tuple[str, str, str | None]]:
        """The GET requests for files whose URL contains ``path_part`` (downloads, not HEADs)."""
        return [r for r in self.requests if r[0] == "GET" and "/resolve/" in r[1] and path_part in r[1]]

    def start(self) -> "HubServer":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _error(self, status: int, code: str, message: str, commit: str | None = None):
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _resolve(self, repo: str, rev: str) -> tuple[Repo, str] | None:
                r = hub.repos.get(repo)
                if r is None:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return None
                if r.gated:
                    self._error(401, "GatedRepo", f"Access to model {repo} is restricted. You must have access "
                                "to it and be authenticated to access it. Please log in.")
                    return None
                commit = r.refs.get(rev, rev if rev in r.commits else None)
                if commit is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    return None
                return r, commit

            def _serve(self, head: bool):
                url = urlparse(self.path)
                path = unquote(url.path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if m:
                    got = self._resolve(m.group(1), m.group(2) or "main")
                    if got is None:
                        return
                    r, commit = got
                    siblings = []
                    for name, data in sorted(r.commits[commit].items()):
                        s = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
                        if name.endswith(LFS_SUFFIXES):
                            s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                        siblings.append(s)
                    body = json.dumps({"id": m.group(1), "modelId": m.group(1), "sha": commit, "private": False,
                                       "gated": False, "siblings": siblings}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(body)
                    return
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m:
                    self._error(404, "NotFound", f"no route {path}")
                    return
                got = self._resolve(m.group(1), m.group(2))
                if got is None:
                    return
                r, commit = got
                data = r.commits[commit].get(m.group(3))
                if data is None:
                    self._error(404, "EntryNotFound", f"{m.group(3)} does not exist", commit)
                    return
                lfs = m.group(3).endswith(LFS_SUFFIXES)
                etag = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if head:
                    return
                key = m.group(3)
                if hub.cut.get(key, 0) > 0:
                    hub.cut[key] -= 1
                    self.wfile.write(body[: len(body) // 2] if not start else b"")
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
