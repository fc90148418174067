"""Start the real production server (`python -m app`) as a child process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if ``process`` has not exited within ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class NotReady(RuntimeError):
    pass


def wait_ready(url: str, timeout: float, is_alive=lambda: True, interval: float = 0.05) -> None:
    """Poll ``url``/readyz until it answers 200; NotReady if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < deadline:
            if not is_alive():
                raise NotReady("the server exited during start-up")
            try:
                if client.get(url + "/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(interval)
    raise NotReady(f"not ready within {timeout}s")


def kubelet_probe(url: str, probe: dict, timeout_budget: float) -> float:
    """Probe as the kubelet does: every periodSeconds, each with timeoutSeconds,
    success on a 2xx/3xx; fail after failureThreshold misses. Seconds taken."""
    started = time.monotonic()
    misses = 0
    while True:
        try:
            status = httpx.get(url + probe["httpGet"]["path"],
                               timeout=probe["timeoutSeconds"]).status_code
            if 200 <= status < 400:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        misses += 1
        assert misses < probe["failureThreshold"], f"{probe['httpGet']['path']} failed"
        assert time.monotonic() - started < timeout_budget
        time.sleep(probe["periodSeconds"])


def get_when_up(url: str, timeout: float = 10) -> httpx.Response:
    """GET a URL whose server may still be starting: the metrics port opens from
    its own thread just after the app is ready (app/metrics.py)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class LiveServer:
    def __init__(self, database_url: str, cwd: Path = ROOT, **env: str) -> None:
        """``cwd``: the checkout whose ``app`` package runs (another release's, say)."""
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "METRICS_PORT": str(self.metrics_port),
            "LOG_FORMAT": "json",
            **env,
        }
        self.process: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def _read_output(self) -> None:
        # Drained continuously: a full pipe would block the server's log writes.
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.append(line)

    def start(self, timeout: float = 30) -> "LiveServer":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=self.cwd, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        try:
            wait_ready(self.url, timeout, lambda: self.process.poll() is None)
        except NotReady as error:
            self.stop()
            raise RuntimeError(f"{error}: {self.output}") from None
        return self

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None and self._reader is not None
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.terminate()  # graceful, so coverage of the child is saved
            try:
                self.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.wait()

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
