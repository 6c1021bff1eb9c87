"""A small Hub-compatible HTTP server for tests, bound to 127.0.0.1.

It speaks the routes the real `huggingface_hub` client uses for model repos (ECOSYSTEM.md): create a repo,
pre-upload ("regular" mode: bytes inline), NDJSON commits with base64 contents, repo info and tree listing,
and HEAD/GET `resolve` downloads with the headers the client reads (X-Repo-Commit, ETag, Content-Length,
X-Error-Code), and branches (commits go to an existing branch, as on the Hub). Repos live in memory with their
full commit history, so revisions can be pinned.

Test hooks: `token` (when set, writes and private reads need `Authorization: Bearer <token>`), `fail_next`
(the next N requests get HTTP 503), and `requests` (a log of (method, path)).

Run on its own: `python tests/hub_server.py --port 8123`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # every branch's, oldest first
    heads: dict[str, str] = field(default_factory=dict)  # branch -> its last commit

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.heads.get("main" if revision == "HEAD" else revision, revision)
        for commit_sha, files in self.commits:
            if commit_sha == sha:
                return commit_sha, files
        return None


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0, token: str | None = None) -> None:
        super().__init__(("127.0.0.1", port), HubHandler)
        self.token = token
        self.fail_next = 0
        self.repos: dict[str, Repo] = {}  # model repos
        self.spaces: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._counter = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> HubServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def new_commit(self, repo: Repo, files: dict[str, bytes], branch: str = "main") -> str:
        self._counter += 1
        parent = repo.heads.get(branch, "")
        listing = "".join(f"{p}:{git_blob_oid(c)}\n" for p, c in sorted(files.items()))
        sha = hashlib.sha1(f"{parent}\n{self._counter}\n{listing}".encode()).hexdigest()
        repo.commits.append((sha, files))
        repo.heads[branch] = sha
        return sha


class HubHandler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None, head: bool = False) -> None:
        self._send(
            status,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", **(headers or {})},
            head,
        )

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code} if code else None, head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        return self.server.token is None or self.headers.get("Authorization") == f"Bearer {self.server.token}"

    def _intercept(self) -> bool:
        """Log the request; answer it with a failure when a test asked for one."""
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
            if self.server.fail_next > 0:
                self.server.fail_next -= 1
                fail = True
            else:
                fail = False
        if fail:
            self._body()
            self._error(503, "Service temporarily unavailable (injected by the test)")
        return fail

    def _store(self, kind: str) -> dict[str, Repo]:
        return self.server.spaces if kind == "spaces" else self.server.repos

    def _repo(self, repo_id: str, head: bool = False, kind: str = "models") -> Repo | None:
        repo = self._store(kind).get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound", head)
            return None
        return repo

    def _revision(self, repo_id: str, revision: str, head: bool, kind: str) -> tuple | None:
        """(repo, commit sha, files) at `revision`, or None after answering 404 (repo or revision unknown)."""
        repo = self._repo(repo_id, head, kind)
        if repo is None:
            return None
        found = repo.files_at(revision)
        if found is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head)
            return None
        return repo, *found

    # -- routes -----------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        if not self._intercept():
            self._route_get(head=True)

    def do_GET(self) -> None:
        if not self._intercept():
            self._route_get(head=False)

    def _route_get(self, head: bool) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[0] == "api" and parts[1] in ("models", "spaces") and len(parts) >= 4:
            kind, repo_id, rest = parts[1], f"{parts[2]}/{parts[3]}", parts[4:]
            if not rest or rest[0] == "revision":
                return self._repo_info(repo_id, rest[1] if len(rest) > 1 else "main", head, kind)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), parse_qs(url.query), head, kind)
        if parts[:2] == ["api", "whoami-v2"]:
            if not self._authorized() or self.server.token is None:
                return self._error(401, "Invalid credentials in Authorization header")
            return self._json(200, {"name": "tester", "type": "user"})
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        if len(parts) >= 6 and parts[0] == "spaces" and parts[3] == "resolve":
            return self._resolve(f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:]), head, "spaces")
        self._error(404, f"No route for {url.path}")

    def _repo_info(self, repo_id: str, revision: str, head: bool, kind: str = "models") -> None:
        found = self._revision(repo_id, revision, head, kind)
        if found is None:
            return
        repo, sha, files = found
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": sha,
            "private": repo.private,
            "siblings": [{"rfilename": path} for path in sorted(files)],
            "tags": [],
        }
        self._json(200, info, head=head)

    def _tree(
        self, repo_id: str, revision: str, prefix: str, query: dict, head: bool, kind: str = "models"
    ) -> None:
        found = self._revision(repo_id, revision, head, kind)
        if found is None:
            return
        _, _, files = found
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path in sorted(files):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            relative = path[len(prefix) + 1 :] if prefix else path
            if "/" in relative and not recursive:
                folders.add((prefix + "/" if prefix else "") + relative.split("/")[0])
                continue
            entries.append(
                {"type": "file", "path": path, "size": len(files[path]), "oid": git_blob_oid(files[path])}
            )
        entries += [
            {"type": "directory", "path": folder, "oid": "0" * 40, "size": 0} for folder in sorted(folders)
        ]
        self._json(200, entries, head=head)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool, kind: str = "models") -> None:
        found = self._revision(repo_id, revision, head, kind)
        if found is None:
            return
        _, sha, files = found
        if path not in files:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", head)
        content = files[path]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{git_blob_oid(content)}"',
            "Content-Length": str(len(content)),
            "Content-Type": "application/octet-stream",
        }
        self._send(200, content, headers, head)

    def do_POST(self) -> None:
        if self._intercept():
            return
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        body = self._body()
        if parts[:2] == ["api", "validate-yaml"]:
            return self._json(200, {"errors": [], "warnings": []})
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        if parts[:3] == ["api", "repos", "create"]:
            return self._create(json.loads(body))
        if parts[0] == "api" and parts[1] in ("models", "spaces") and len(parts) >= 6:
            kind, repo_id = parts[1], f"{parts[2]}/{parts[3]}"
            if parts[4] == "preupload":
                return self._preupload(repo_id, parts[5], json.loads(body), kind)
            if parts[4] == "commit":
                return self._commit(repo_id, parts[5], body, kind)
            if parts[4] == "branch":
                return self._branch(repo_id, parts[5], json.loads(body or b"{}"), kind)
        self._error(404, f"No route for POST {self.path}")

    def _create(self, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        if repo_type not in ("model", "space"):
            return self._error(400, "This test server holds model repos and Spaces only")
        if repo_type == "space" and not payload.get("sdk"):
            return self._error(400, "A Space needs an sdk")
        store = self._store(f"{repo_type}s")
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"{self.server.url}/{'spaces/' if repo_type == 'space' else ''}{repo_id}"
        with self.server.lock:
            if repo_id in store:
                return self._json(409, {"error": f"You already created this {repo_type} repo", "url": url})
            repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            self.server.new_commit(repo, {".gitattributes": gitattributes})
            store[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id})

    def _preupload(self, repo_id: str, revision: str, payload: dict, kind: str) -> None:
        repo = self._repo(repo_id, kind=kind)
        if repo is None:
            return
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]
        ]
        self._json(200, {"files": files, "commitOid": repo.heads.get(revision, repo.heads["main"])})

    def _branch(self, repo_id: str, branch: str, payload: dict, kind: str) -> None:
        repo = self._repo(repo_id, kind=kind)
        if repo is None:
            return
        with self.server.lock:
            if branch in repo.heads:
                return self._error(409, f"Reference already exists: {branch}")
            start = repo.files_at(payload.get("startingPoint") or "main")
            if start is None:
                return self._error(404, f"Invalid rev id: {payload.get('startingPoint')}", "RevisionNotFound")
            repo.heads[branch] = start[0]
        self._json(200, {})

    def _commit(self, repo_id: str, revision: str, body: bytes, kind: str) -> None:
        repo = self._repo(repo_id, kind=kind)
        if repo is None:
            return
        if revision not in repo.heads:  # the real Hub: a commit goes to an existing branch
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        with self.server.lock:
            files = dict(repo.files_at(revision)[1])
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    content = value["content"]
                    data = (
                        base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    )
                    files[value["path"]] = data
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    for path in [p for p in files if p == value["path"] or p.startswith(value["path"] + "/")]:
                        del files[path]
                elif item["key"] == "lfsFile":
                    return self._error(400, "LFS uploads are not supported by this test server")
            sha = self.server.new_commit(repo, files, revision)
        self._json(
            200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True}
        )


def upload_plain(server: HubServer, repo_id: str, folder: str, token: str | None = None) -> str:
    """Upload a folder (subfolders too) as a Hub repo with plain client calls; returns the commit sha."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=server.url, token=token or server.token)
    api.create_repo(repo_id, exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo=os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"),
            path_or_fileobj=os.path.join(root, name),
        )
        for root, _, names in sorted(os.walk(folder))
        for name in sorted(names)
    ]
    return api.create_commit(repo_id, operations=operations, commit_message="upload").oid


def with_license(folder: str, destination: str | os.PathLike, license: str) -> str:
    """A copy of a model folder with a model card that states its license, as a real repo's card does."""
    import shutil

    shutil.copytree(folder, destination)
    with open(os.path.join(destination, "README.md"), "w") as f:
        f.write(f"---\nlicense: {license}\n---\n# tiny stand-in\n")
    return str(destination)


def client_env(server: HubServer, home: str | os.PathLike) -> dict[str, str]:
    """The environment of a process that uses the server as its Hub, as a user on another machine would (HF_ENDPOINT;
    the test suite itself runs offline); `home` becomes its HF_HOME (its own download cache)."""
    return {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": server.token or "",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--token")
    args = parser.parse_args()
    server = HubServer(args.port, args.token)
    print(f"serving on {server.url}", flush=True)
    server.serve_forever()
