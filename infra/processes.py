"""Which process is alive, and which one holds a port: what `stack up` needs to adopt its own
servers or refuse, and `stack down` to stop exactly those.

Linux answers through /proc; elsewhere `ps` names a process and port holders stay unknown (None).
A zombie (exited, not yet reaped by its parent) counts as gone: it holds no port and does no work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

_PROC = Path("/proc")


def has_proc() -> bool:
    return (_PROC / "self" / "fd").is_dir()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    if has_proc():
        try:
            state = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")
    return True


def pid_command(pid: int) -> str:
    """The command line of a live process ("" when it is gone or cannot be read)."""
    if has_proc():
        try:
            return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return ""
    ps = subprocess.run(["ps", "-p", str(pid), "-o", "args="], capture_output=True, text=True, check=False)
    return ps.stdout.strip()


def pid_exe_name(pid: int) -> str:
    """The file name of the program a live process runs ("" when it cannot be read). Not argv[0]:
    Redis rewrites that into a title."""
    if has_proc():
        try:
            return Path(os.readlink(_PROC / str(pid) / "exe")).name.removesuffix(" (deleted)")
        except OSError:
            return ""
    ps = subprocess.run(["ps", "-p", str(pid), "-o", "comm="], capture_output=True, text=True, check=False)
    return Path(ps.stdout.strip()).name


def pid_cwd(pid: int) -> Path | None:
    """A process's working directory; None where that cannot be known (no /proc). A process this
    user may not inspect gives Path("/proc") (matches no folder of ours)."""
    if not has_proc():
        return None
    try:
        return Path(os.readlink(_PROC / str(pid) / "cwd"))
    except OSError:
        return _PROC


def describe(pid: int) -> str:
    command = pid_command(pid)
    return f"pid {pid} ({command[:100]})" if command else f"pid {pid}"


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as Redis and weed set it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _listening_inodes() -> dict[int, int]:
    """Socket inode -> port, for every listening TCP socket of the machine."""
    found: dict[int, int] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), (_PROC / "net" / table).open() as f:
            for line in list(f)[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A":  # LISTEN
                    found[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in (_PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def listening_ports(pid: int) -> set[int] | None:
    """The TCP ports `pid` listens on; None where that cannot be known (no /proc)."""
    if not has_proc():
        return None
    listening = _listening_inodes()
    return {listening[i] for i in _socket_inodes(pid) if i in listening}


def port_holder(port: int) -> int | None:
    """The pid listening on `port`, when it can be found (Linux, a process this user may inspect)."""
    if not has_proc():
        return None
    inodes = {inode for inode, p in _listening_inodes().items() if p == port}
    if not inodes:
        return None
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and _socket_inodes(int(entry.name)) & inodes:
            return int(entry.name)
    return None


def stop_pid(pid: int, timeout_s: float) -> bool:
    """SIGTERM, then SIGKILL after timeout_s. True once the process is gone; False if it outlives
    SIGKILL by 10 s (stuck in the kernel)."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
    return False
