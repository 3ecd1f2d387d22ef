"""Helpers for tests that start a real HTTP server in a subprocess: a free loopback port, and
waiting until the server answers (failing with its output if it died first)."""

from __future__ import annotations

import socket
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, proc, timeout: float = 150.0) -> None:
    """Poll `url` until it answers; assert the server process `proc` is still alive meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            out = proc.stdout.read() if proc.poll() is not None and proc.stdout else ""
            assert proc.poll() is None, f"server exited with {proc.returncode}: {out}"
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout} s"
            time.sleep(0.5)
