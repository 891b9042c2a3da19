"""A real `llmprune serve` process on 127.0.0.1 for the tests: started in its own process group, polled
until its perplexity check has an outcome, stopped with SIGTERM (SIGKILL if it hangs)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]  # the repository root (tests/helpers/serving.py)
START_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m llmprune serve MODEL FLAGS` on a free port; `key` is sent as the bearer token."""

    def __init__(self, model: Path, *flags: str, key: str | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="llmprune-serve-", suffix=".log", delete=False)
        environ = {**os.environ, **(env or {})}
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "llmprune", "serve", str(model), "--port", str(self.port), *flags]
        # Its own process group (stopped whole below) but not its own session: with the kernel's autogroup
        # scheduling a new session is a CPU group of its own, and on 2 cores vLLM's busy engine-core and
        # worker processes then starve the API process in their group, which answers one request at a time
        # (each stream's headers only after the one before ends; measured with stock vLLM as well).
        self.process = subprocess.Popen(
            command, stdout=self.log_file, stderr=subprocess.STDOUT, env=environ, process_group=0
        )

    def headers(self, key: str | None = None) -> dict[str, str]:
        token = key or self.key
        return {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, **kwargs) -> httpx.Response:
        kwargs.setdefault("headers", self.headers())
        kwargs.setdefault("timeout", 60)
        return httpx.get(self.url + path, **kwargs)

    def post(self, path: str, body: dict | None = None, **kwargs) -> httpx.Response:
        kwargs.setdefault("headers", self.headers())
        kwargs.setdefault("timeout", 120)
        return httpx.post(self.url + path, json=body, **kwargs)

    def log(self) -> str:
        self.log_file.flush()
        return Path(self.log_file.name).read_text(errors="replace")

    def wait_checked(self) -> dict:
        """Poll /ready until the start-up check passed or failed; returns the /ready body."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                body = self.get("/ready", timeout=5).json()
                if body["check"]["status"] != "pending":
                    return body
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not checked after {START_TIMEOUT} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM to the server (it shuts its engine down), then SIGKILL to whatever is left of its group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log_file.close()
        os.unlink(self.log_file.name)
