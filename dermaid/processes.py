"""Processes, signals and ports: stopping child process groups (`dermaid serve`, `ray start --head`) from
tests and benchmarks, keeping this process's Ctrl-C handler across Ray calls, picking a free local port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def sigint_handler_kept() -> Iterator[None]:
    """Put this process's Ctrl-C handler back after the block. Ray Train's fit() installs its own (abort
    the training run) and leaves it: Ctrl-C later in the same process, such as the demo's serving step,
    would only log "aborting the training run" and never stop."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread handles signals
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not installed from Python, nothing to restore
            signal.signal(signal.SIGINT, previous)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_process_group(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """Popen `cmd` as the leader of a new process group, with Ctrl-C (SIGINT) at its default: a process
    started in the background by a non-interactive shell (a CI script's `cmd &`) ignores SIGINT, and its
    children would inherit that, so stop_process_group's Ctrl-C would not reach them."""
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_default_sigint, **popen_kwargs)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 60.0) -> int | None:
    """Send `sig` to the group of `proc` (started by start_process_group), as Ctrl-C does to a
    terminal's foreground group; SIGKILL it if it has not exited after `timeout_s`. Returns the exit code."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
