"""Child processes and ports: stopping process groups (`dermaid serve`, `ray start --head`) from tests and
benchmarks, and picking a free local port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 60.0) -> int | None:
    """Send `sig` to the group of `proc` (started with start_new_session=True), as Ctrl-C does to a
    terminal's foreground group; SIGKILL it if it has not exited after `timeout_s`. Returns the exit code."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
