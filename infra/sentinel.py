"""A Redis group that fails over, on loopback: a primary, replicas and sentinels, real `redis-server`
processes (the stack's binary), for the failover test and the chaos benchmark.

Every node requires one password (the replicas authenticate to the primary with it, the sentinels
to the nodes and to each other). The sentinels declare the primary down after `down_after_ms`
without an answer; with a quorum of two of three they promote a replica. State lives in one folder.

    group = SentinelGroup(folder); group.start()
    env = group.env()                  # SDFARM_REDIS_URL=sentinel://...;..., the master's name
    group.kill_master()                # SIGKILL, as a node that dies
    group.wait_failover(old_port)      # until the sentinels name another node
    group.stop()
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis

from .processes import stop_pid
from .stack import StackError, find_redis_server, free_port

MASTER_NAME = "sdfarm"


@dataclass
class _Node:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class SentinelGroup:
    folder: Path
    replicas: int = 1
    sentinels: int = 3
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    nodes: list[_Node] = field(default_factory=list)  # the primary first, then the replicas
    watchers: list[_Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """SDFARM_REDIS_URL: every sentinel; the first carries the master's password and database."""
        first, *rest = self.watchers
        return ";".join([f"sentinel://:{self.password}@127.0.0.1:{first.port}/0",
                         *(f"sentinel://127.0.0.1:{w.port}" for w in rest)])

    def env(self) -> dict[str, str]:
        return {"SDFARM_REDIS_URL": self.url, "SDFARM_REDIS_SENTINEL_MASTER": MASTER_NAME,
                "SDFARM_REDIS_SENTINEL_PASSWORD": self.password}

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 30) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.nodes = [_Node(f"redis-{n}", free_port()) for n in range(1 + self.replicas)]
        self.watchers = [_Node(f"sentinel-{n}", free_port()) for n in range(self.sentinels)]
        primary = self.nodes[0]
        for node in self.nodes:
            self._spawn(node, self._node_conf(node, None if node is primary else primary.port))
        for node in self.nodes:
            self._wait(partial(self._answers, node.port), f"{node.name} answers", timeout_s)
        for watcher in self.watchers:
            self._spawn(watcher, self._sentinel_conf(watcher, primary.port), sentinel=True)
        self._wait(lambda: self._replicas_synced(primary.port), "the replicas are in sync", timeout_s)
        self._wait(lambda: self._sentinels_agree(primary.port), "every sentinel sees the primary and its peers",
                   timeout_s)

    def stop(self) -> None:
        for node in [*self.watchers, *self.nodes]:
            if node.proc is not None and node.proc.poll() is None:
                stop_pid(node.proc.pid, 10)
            node.proc = None

    def _spawn(self, node: _Node, conf: list[str], sentinel: bool = False) -> None:
        folder = self.folder / node.name
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / ("sentinel.conf" if sentinel else "redis.conf")
        path.write_text("\n".join([*conf, f"dir {folder}", "daemonize no", f"logfile {folder / 'log'}"]) + "\n")
        path.chmod(0o600)
        argv = [find_redis_server(), str(path), *(["--sentinel"] if sentinel else [])]
        node.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, cwd=folder)

    def _node_conf(self, node: _Node, primary_port: int | None) -> list[str]:
        conf = [f"port {node.port}", "bind 127.0.0.1", f"requirepass {self.password}",
                f"masterauth {self.password}", "appendonly yes", "appendfsync everysec", 'save ""',
                "maxmemory-policy noeviction"]
        return conf + ([f"replicaof 127.0.0.1 {primary_port}"] if primary_port else [])

    def _sentinel_conf(self, watcher: _Node, primary_port: int) -> list[str]:
        return [f"port {watcher.port}", "bind 127.0.0.1", f"requirepass {self.password}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 2",
                f"sentinel auth-pass {MASTER_NAME} {self.password}",
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
                f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {MASTER_NAME} 1"]

    # ------------------------------------------------------------------ faults and views

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers names it now."""
        for watcher in self.watchers:
            try:
                return self._master_addr(watcher.port)
            except redis.RedisError:
                continue
        raise StackError("no sentinel answers")

    def kill_master(self) -> int:
        """SIGKILL the node that is master now (a crash); its port."""
        port = self.master_port()
        self.stop_node(port, kill=True)
        return port

    def stop_node(self, port: int, kill: bool = False) -> None:
        """SIGTERM (it writes its AOF) or SIGKILL the node on `port`, and wait until it is gone."""
        node = self._node(port)
        if node.proc is not None:
            if kill:
                node.proc.kill()
                node.proc.wait()
            else:
                stop_pid(node.proc.pid, 10)
        node.proc = None

    def start_node(self, port: int, timeout_s: float = 30) -> None:
        """Start a stopped node again from its configuration and data; the sentinels make it a replica
        if they promoted another node meanwhile."""
        node = self._node(port)
        folder = self.folder / node.name
        node.proc = subprocess.Popen([find_redis_server(), str(folder / "redis.conf")], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     cwd=folder)
        self._wait(partial(self._answers, port), f"{node.name} answers again", timeout_s)

    def _node(self, port: int) -> _Node:
        return next(n for n in self.nodes if n.port == port)

    def wait_failover(self, old_port: int, timeout_s: float = 60) -> int:
        """Wait until the sentinels agree on a new master that answers as one; its port."""
        def promoted() -> bool:
            ports = {self._named_master(w.port) for w in self.watchers if w.proc is not None}
            if len(ports) != 1 or None in ports or old_port in ports:
                return False
            port = ports.pop()
            assert port is not None
            role: Any = self._client(port).execute_command("ROLE")  # type: ignore[no-untyped-call]
            return bool(role and role[0] == b"master")
        self._wait(promoted, "the sentinels promote a replica", timeout_s)
        return self.master_port()

    def _named_master(self, sentinel_port: int) -> int | None:
        try:
            return self._master_addr(sentinel_port)
        except (redis.RedisError, TypeError):
            return None

    def _answers(self, port: int) -> bool:
        return bool(self._client(port).ping())

    def _master_addr(self, sentinel_port: int) -> int:
        addr: Any = self._client(sentinel_port).sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(addr[1])

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=2, socket_connect_timeout=2)

    def _replicas_synced(self, primary_port: int) -> bool:
        info = self._client(primary_port).info("replication")
        return int(info.get("connected_slaves", 0)) == self.replicas and all(
            info.get(f"slave{n}", {}).get("state") == "online" for n in range(self.replicas))

    def _sentinels_agree(self, primary_port: int) -> bool:
        for watcher in self.watchers:
            masters: Any = self._client(watcher.port).sentinel_masters()
            state = masters.get(MASTER_NAME)
            if state is None or int(state["port"]) != primary_port or int(state["num-other-sentinels"]) \
                    < self.sentinels - 1 or int(state["num-slaves"]) < self.replicas:
                return False
        return True

    def _wait(self, condition: Callable[[], bool], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (redis.RedisError, OSError) as e:
                last = e
            time.sleep(0.1)
        raise StackError(f"Redis group in {self.folder}: timed out waiting until {what}"
                         + (f" ({last})" if last else ""))
