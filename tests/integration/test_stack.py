"""The embedded stack is the real thing: Redis with a password, S3 with credentials and If-None-Match;
`stack up` adopts or refuses, `stack down` stops what runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from botocore.exceptions import ClientError

from infra.stack import EmbeddedStack, StackInfo
from sdfarm.store import Store
from tests.conftest import cli, wait_for


def test_redis_requires_the_password(stack_info: StackInfo) -> None:
    anonymous = redis.Redis(port=stack_info.redis_port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    assert redis.Redis.from_url(stack_info.redis_url).ping()


def test_redis_runs_with_aof_and_noeviction(stack_info: StackInfo) -> None:
    config = redis.Redis.from_url(stack_info.redis_url).config_get("*")
    assert config["appendonly"] == "yes"
    assert config["maxmemory-policy"] == "noeviction"


def test_s3_rejects_wrong_credentials(stack_info: StackInfo) -> None:
    client = boto3.client("s3", endpoint_url=stack_info.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=stack_info.s3_access_key, aws_secret_access_key="wrong")
    with pytest.raises(ClientError, match=r"SignatureDoesNotMatch|AccessDenied"):
        client.list_objects_v2(Bucket=stack_info.bucket)


def test_put_if_absent_first_writer_wins(store: Store) -> None:
    key = "tests/put-if-absent"
    assert store.put_if_absent(key, b"first", "text/plain") is True
    assert store.put_if_absent(key, b"second", "text/plain") is False
    assert store.get(key) == b"first"


# ------------------------------------------------------------------ `stack up` / `stack down`
# Each test runs a stack of its own, through the real command line (a fresh interpreter per call,
# as an operator would) or the EmbeddedStack API, and checks processes and ports themselves.


def _alive(pid: int) -> bool:
    """Running, not a zombie (a server whose `stack up` parent exited is reaped by init, or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _recorded(state_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state_dir / "stack.json").read_text())
    return data


def _ports(state_dir: Path) -> list[int]:
    data = _recorded(state_dir)
    return [data["redis_port"], data["s3_port"], *data["weed_ports"].values()]


def _stack(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(["stack", *args, "--dir", str(state_dir)], env={})


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A stack folder; afterwards, every process still working in it is SIGKILLed, recorded or not
    (a failing test must not leave servers behind)."""
    folder = tmp_path / "stack"
    yield folder
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(proc / "cwd").startswith(str(folder)) and _alive(int(proc.name)):
                    os.kill(int(proc.name), signal.SIGKILL)


def _assert_all_gone(state_dir: Path, pids: list[int]) -> None:
    wait_for(lambda: not any(_alive(p) for p in pids), 10, f"pids {pids} to exit")
    assert [p for p in _ports(state_dir) if not _port_free(p)] == []


def test_up_twice_adopts_the_running_servers_and_down_stops_them(state_dir: Path) -> None:
    first = _stack(state_dir, "up")
    assert first.returncode == 0, first.stderr
    redis_pid, weed_pid = _recorded(state_dir)["redis_pid"], _recorded(state_dir)["weed_pid"]
    assert _alive(redis_pid)
    assert _alive(weed_pid)

    second = _stack(state_dir, "up")
    assert second.returncode == 0, second.stderr
    assert f"Redis: already running, pid {redis_pid}" in second.stderr
    assert f"S3 (SeaweedFS): already running, pid {weed_pid}" in second.stderr
    assert second.stdout == first.stdout  # the same `export SDFARM_...` lines
    assert (_recorded(state_dir)["redis_pid"], _recorded(state_dir)["weed_pid"]) == (redis_pid, weed_pid)
    assert _alive(redis_pid)
    assert _alive(weed_pid)
    assert redis.Redis.from_url(StackInfo(**_recorded(state_dir)).redis_url).ping()

    down = _stack(state_dir, "down")
    assert down.returncode == 0, down.stderr
    assert f"stopped Redis (pid {redis_pid})" in down.stdout
    assert f"stopped S3 (SeaweedFS) (pid {weed_pid})" in down.stdout
    _assert_all_gone(state_dir, [redis_pid, weed_pid])
    assert (_recorded(state_dir)["redis_pid"], _recorded(state_dir)["weed_pid"]) == (None, None)


def test_up_on_a_half_running_stack_starts_only_what_is_missing(state_dir: Path) -> None:
    assert _stack(state_dir, "up").returncode == 0
    old_redis, weed_pid = _recorded(state_dir)["redis_pid"], _recorded(state_dir)["weed_pid"]
    os.kill(old_redis, signal.SIGKILL)
    wait_for(lambda: not _alive(old_redis), 10, "Redis to die")

    up = _stack(state_dir, "up")
    assert up.returncode == 0, up.stderr
    new_redis = _recorded(state_dir)["redis_pid"]
    assert new_redis != old_redis
    assert f"Redis: started, pid {new_redis}" in up.stderr
    assert f"S3 (SeaweedFS): already running, pid {weed_pid}" in up.stderr
    assert _alive(new_redis)
    assert _recorded(state_dir)["weed_pid"] == weed_pid
    assert redis.Redis.from_url(StackInfo(**_recorded(state_dir)).redis_url).ping()

    down = _stack(state_dir, "down")
    assert down.returncode == 0, down.stderr
    assert f"stopped Redis (pid {new_redis})" in down.stdout
    _assert_all_gone(state_dir, [new_redis, weed_pid])


def test_up_refuses_a_port_held_by_another_process_and_starts_nothing(state_dir: Path) -> None:
    assert _stack(state_dir, "up").returncode == 0
    assert _stack(state_dir, "down").returncode == 0
    port = _recorded(state_dir)["redis_port"]
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        up = _stack(state_dir, "up")
        assert up.returncode == 1
        assert f"cannot start Redis: 127.0.0.1:{port} (port) is in use by pid {os.getpid()}" in up.stderr
        assert up.stdout == ""
        assert (_recorded(state_dir)["redis_pid"], _recorded(state_dir)["weed_pid"]) == (None, None)
        assert [p for p in _ports(state_dir) if p != port and not _port_free(p)] == []


def test_down_says_so_when_nothing_runs(state_dir: Path) -> None:
    never = _stack(state_dir, "down")
    assert never.returncode == 0, never.stderr
    assert "nothing was running" in never.stdout
    assert _stack(state_dir, "up").returncode == 0
    assert _stack(state_dir, "down").returncode == 0
    again = _stack(state_dir, "down")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "nothing was running"


def test_a_second_stack_object_adopts_the_servers_and_stops_them(state_dir: Path) -> None:
    first = EmbeddedStack(state_dir)
    first.start()
    assert first.redis_proc is not None
    assert first.weed_proc is not None
    try:
        second = EmbeddedStack(state_dir)
        info = second.start()
        redis_pid, weed_pid = first.redis_proc.pid, first.weed_proc.pid
        assert (info.redis_pid, info.weed_pid) == (redis_pid, weed_pid)
        assert second.redis_proc is None  # adopted, not started
        assert second.weed_proc is None
        assert first.redis_proc.poll() is None
        assert first.weed_proc.poll() is None
        stopped = second.stop()
        assert stopped == [f"stopped S3 (SeaweedFS) (pid {weed_pid})", f"stopped Redis (pid {redis_pid})"]
        assert first.redis_proc.wait(10) is not None
        assert first.weed_proc.wait(10) is not None
        _assert_all_gone(state_dir, [redis_pid, weed_pid])
        assert (info.redis_pid, info.weed_pid) == (None, None)
        assert second.stop() == []
    finally:
        first.stop()
