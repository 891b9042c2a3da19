"""A small stand-in for the Hugging Face Hub API on 127.0.0.1, enough for huggingface_hub's create-repo and
commit flow: whoami, repo create/info, branch, validate-yaml, preupload, LFS batch/upload/verify, NDJSON commit.

It records what arrives (repos, branches, commits with the bytes of every file) for the tests to check.
Uploads take the plain LFS path: the tests set HF_HUB_DISABLE_XET=1 (hf_xet is installed, and
huggingface_hub picks Xet on the client side whenever it is available, without asking the server).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_THRESHOLD = 10 * 2**20


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]
    lfs_paths: list[str]
    oid: str


@dataclass
class FakeHub:
    """The server's state. `tokens` maps a token to (user, orgs); `foreign` repos exist but belong to others."""

    tokens: dict[str, tuple[str, list[str]]]
    foreign: set[str] = field(default_factory=set)
    repos: dict[str, dict] = field(default_factory=dict)
    branches: dict[str, set[str]] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    endpoint: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def user(self, headers) -> tuple[str, list[str]] | None:
        auth = headers.get("Authorization", "")
        return self.tokens.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

    def can_write(self, headers, repo_id: str) -> bool:
        who = self.user(headers)
        return who is not None and repo_id.split("/")[0] in (who[0], *who[1]) and repo_id not in self.foreign


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        return

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: dict | None = None, error_code: str | None = None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        hub = self.hub
        path = urlparse(self.path).path
        body = self._body()
        with hub.lock:
            hub.requests.append((method, path))
        routes = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda b: self._send(200, {"errors": [], "warnings": []})),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>.+))?", self._repo_info),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)", self._create_branch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_upload),
            ("POST", r"/lfs-verify", self._lfs_verify),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                self.params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                return handler(body)
        self._send(404, {"error": f"no route {method} {path}"})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def _whoami(self, body: bytes) -> None:
        who = self.hub.user(self.headers)
        if who is None:
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        orgs = [{"name": org, "type": "org"} for org in who[1]]
        self._send(200, {"type": "user", "name": who[0], "orgs": orgs, "auth": {"type": "access_token"}})

    def _create_repo(self, body: bytes) -> None:
        payload = json.loads(body)
        who = self.hub.user(self.headers)
        if who is None:
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        repo_id = f"{payload.get('organization') or who[0]}/{payload['name']}"
        if repo_id in self.hub.repos or repo_id in self.hub.foreign:
            if not self.hub.can_write(self.headers, repo_id):
                return self._send(403, {"error": "You don't have the rights to create a model under this namespace"})
            return self._send(409, {"error": "You already created this model repo", "url": self._url(repo_id)})
        if not self.hub.can_write(self.headers, repo_id):
            return self._send(403, {"error": "You don't have the rights to create a model under this namespace"})
        with self.hub.lock:
            self.hub.repos[repo_id] = {"visibility": payload.get("visibility"), "type": payload.get("type")}
            self.hub.branches[repo_id] = {"main"}
        self._send(200, {"url": self._url(repo_id), "name": repo_id})

    def _url(self, repo_id: str) -> str:
        return f"{self.hub.endpoint}/{repo_id}"

    def _repo_info(self, body: bytes) -> None:
        repo_id = self.params["repo"]
        if repo_id not in self.hub.repos and repo_id not in self.hub.foreign:
            return self._send(404, {"error": "Repository not found"}, error_code="RepoNotFound")
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": "0" * 40, "private": False, "siblings": []})

    def _create_branch(self, body: bytes) -> None:
        repo_id, branch = self.params["repo"], self.params["rev"]
        if not self.hub.can_write(self.headers, repo_id):
            return self._send(403, {"error": "You don't have write access to this repo"})
        if branch in self.hub.branches[repo_id]:
            return self._send(409, {"error": "Branch already exists"})
        with self.hub.lock:
            self.hub.branches[repo_id].add(branch)
        self._send(200, {})

    def _preupload(self, body: bytes) -> None:
        repo_id = self.params["repo"]
        if not self.hub.can_write(self.headers, repo_id):
            return self._send(403, {"error": "You don't have write access to this repo"})
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] > LFS_THRESHOLD else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in json.loads(body)["files"]
        ]
        self._send(200, {"files": files})

    def _lfs_batch(self, body: bytes) -> None:
        if not self.hub.can_write(self.headers, self.params["repo"]):
            return self._send(403, {"message": "write access denied"})
        objects = [
            {
                "oid": obj["oid"],
                "size": obj["size"],
                "authenticated": True,
                "actions": {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.endpoint}/lfs-verify"},
                },
            }
            for obj in json.loads(body)["objects"]
        ]
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_upload(self, body: bytes) -> None:
        oid = self.params["oid"]
        if hashlib.sha256(body).hexdigest() != oid:
            return self._send(400, {"error": "sha256 mismatch"})
        with self.hub.lock:
            self.hub.lfs[oid] = body
        self._send(200, {})

    def _lfs_verify(self, body: bytes) -> None:
        payload = json.loads(body)
        stored = self.hub.lfs.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            return self._send(404, {"error": "object not uploaded"})
        self._send(200, {})

    def _commit(self, body: bytes) -> None:
        repo_id, revision = self.params["repo"], self.params["rev"]
        if not self.hub.can_write(self.headers, repo_id):
            return self._send(403, {"error": "You don't have write access to this repo"})
        if revision not in self.hub.branches.get(repo_id, set()):
            return self._send(404, {"error": f"Invalid rev id: {revision}"}, error_code="RevisionNotFound")
        header, files, lfs_paths = {}, {}, []
        for line in body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._send(400, {"error": f"LFS object {value['oid']} was not uploaded"})
                files[value["path"]] = self.hub.lfs[value["oid"]]
                lfs_paths.append(value["path"])
        oid = hashlib.sha1(body).hexdigest()
        commit = Commit(repo_id, revision, header["summary"], header.get("description", ""), files, lfs_paths, oid)
        with self.hub.lock:
            self.hub.commits.append(commit)
        self._send(200, {"commitUrl": f"{self._url(repo_id)}/commit/{oid}", "commitOid": oid, "success": True})


def serve(hub: FakeHub) -> ThreadingHTTPServer:
    """Start `hub` on 127.0.0.1 (a free port) in a daemon thread; sets hub.endpoint. Stop with .shutdown()."""
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
