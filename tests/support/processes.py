"""Child processes for the tests and the benchmark: free ports, start with a log, wait for health, stop with grace.

Standard library only, so `bench/run.py` can use it without importing the app. Each process
starts in its own session (Ctrl-C reaches only us) with its output in a log file; stopping
is SIGTERM, then SIGKILL to its whole process group after a grace period.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class ProcessError(Exception):
    """A child process did not start or answer; the message carries the end of its log."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A started subprocess and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_text(self) -> str:
        """Everything it wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of its output."""
        return "\n".join(self.log_text().splitlines()[-lines:])


def start_process(
    name: str,
    command: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    *,
    cwd: Path = ROOT,
    stdout_to_log: bool = True,
) -> Proc:
    """Start `command` in its own session; stderr (and stdout, unless `stdout_to_log` is false) goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        popen = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=out if stdout_to_log else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if stdout_to_log else out,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def _kill_group(proc: Proc) -> None:
    """SIGKILL the process and everything in its session (an uvicorn supervisor's workers)."""
    try:
        os.killpg(proc.popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.popen.kill()


async def kill_process_async(proc: Proc) -> None:
    """SIGKILL the process and its whole session, as a crash or the OOM killer would, and reap it."""
    if proc.popen.poll() is None:
        _kill_group(proc)
    await asyncio.to_thread(proc.popen.wait)


def stop_process(proc: Proc, grace: float = 20.0) -> bool:
    """SIGTERM, then SIGKILL after `grace` seconds; True if it stopped on its own."""
    if proc.popen.poll() is not None:
        return True
    proc.popen.terminate()
    try:
        proc.popen.wait(grace)
        return True
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.popen.wait()
        return False


async def stop_process_async(proc: Proc, grace: float = 20.0) -> bool:
    """`stop_process` without blocking the event loop (the child may need servers that run in it)."""
    if proc.popen.poll() is not None:
        return True
    proc.popen.terminate()
    deadline = time.monotonic() + grace
    while proc.popen.poll() is None:
        if time.monotonic() > deadline:
            _kill_group(proc)
            await asyncio.to_thread(proc.popen.wait)
            return False
        await asyncio.sleep(0.02)
    return True


def wait_for_log(proc: Proc, needle: str, timeout: float = 15.0) -> None:
    """Wait until the process prints `needle`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in proc.log_text():
            return
        if proc.popen.poll() is not None:
            break
        time.sleep(0.05)
    raise ProcessError(f"{proc.name} did not start:\n{proc.log_tail()}")


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_for_health(proc: Proc, url: str, timeout: float = 60.0) -> None:
    """Wait until `GET url` answers 200 (blocking: for scripts, not for a running event loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            break
        if _answers_200(url):
            return
        time.sleep(0.1)
    raise ProcessError(f"{proc.name} never answered 200 on {url}:\n{proc.log_tail()}")


async def wait_for_health_async(proc: Proc, url: str, seconds: float = 60.0) -> None:
    """`wait_for_health` without blocking the event loop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            break
        if await asyncio.to_thread(_answers_200, url):
            return
        await asyncio.sleep(0.05)
    code = proc.popen.poll()
    state = f"exited with {code}" if code is not None else "still running"
    raise ProcessError(f"{proc.name} never answered 200 on {url} ({state}):\n{proc.log_tail()}")


class Processes:
    """Every subprocess of a run, so that all of them are stopped whatever happens."""

    def __init__(self, log_dir: Path, warn: Callable[[str], None] | None = None) -> None:
        """Start with none; logs go to `log_dir/<name>.log`; `warn` hears of processes that had to be killed."""
        self.log_dir = log_dir
        self.warn = warn
        self.running: list[Proc] = []

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start a command in its own session, output to its log file."""
        proc = start_process(name, command, self.log_dir / f"{name}.log", env)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 20.0) -> bool:
        """Terminate, then kill after `grace` seconds; True if it stopped on its own."""
        if proc in self.running:
            self.running.remove(proc)
        stopped = stop_process(proc, grace)
        if not stopped and self.warn is not None:
            self.warn(f"warning: {proc.name} did not stop in {grace:.0f}s and was killed")
        return stopped

    def stop_all(self) -> None:
        """Stop everything still running, newest first."""
        for proc in reversed(list(self.running)):
            self.stop(proc, grace=10.0)
