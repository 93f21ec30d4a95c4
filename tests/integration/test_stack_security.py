"""Nobody without the stack's keys reads or writes the bucket through any port its SeaweedFS opens.

A stack of its own (the probes write and delete on purpose). Every TCP port and Unix socket the
weed process listens on is found from /proc, not from the stack's config, so a port added later
is probed too. Anonymous clients: plain HTTP (GET, PUT, multipart POST, DELETE), cleartext and TLS
HTTP/2 (what a gRPC client sends first), and the `weed` command line itself (real gRPC clients).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import ssl
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.stack import EmbeddedStack, StackInfo, find_weed
from sdfarm.settings import Settings
from sdfarm.store import Store
from tests.conftest import running_stack

if not Path("/proc/self/fd").is_dir():  # pragma: no cover - the suite runs on Linux
    pytest.skip("finds the listening sockets through /proc", allow_module_level=True)

KEY = "locked/written-once.txt"
ORIGINAL = b"written once by the farm"
FORGED = b"forged by a stranger"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    yield from running_stack(tmp_path_factory.mktemp("secured-stack"))


@pytest.fixture(scope="module")
def info(secured: EmbeddedStack) -> StackInfo:
    assert secured.info is not None
    return secured.info


@pytest.fixture(scope="module")
def farm_store(info: StackInfo) -> Store:
    return Store.from_settings(Settings.from_env(info.env()))


@pytest.fixture(scope="module")
def fid(secured: EmbeddedStack, info: StackInfo, farm_store: Store) -> str:
    """The object's volume file id, looked up as the operator (the stack's own files), not anonymously."""
    assert farm_store.put_if_absent(KEY, ORIGINAL, "text/plain") is True
    p = info.weed_ports
    shell = subprocess.run(
        [find_weed(), "shell", f"-master=127.0.0.1:{p['master']}.{p['master_grpc']}",
         f"-filer=127.0.0.1:{p['filer']}.{p['filer_grpc']}"],
        input=f"fs.meta.cat /buckets/{info.bucket}/{KEY}\n", capture_output=True, text=True, timeout=60,
        cwd=secured.dir / "s3", check=False)
    found = re.search(r'"fileId":\s*"([0-9]+,[0-9a-f]+)"', shell.stdout)
    assert found, f"no file id in `weed shell` output:\n{shell.stdout[-2000:]}\n{shell.stderr[-2000:]}"
    return found.group(1)


# ---------------------------------------------------------------------------------------- /proc

def _listening_inodes() -> tuple[dict[int, tuple[str, int]], dict[int, str]]:
    tcp: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    host = socket.inet_ntop(socket.AF_INET, raw[::-1])
                else:  # four little-endian 32-bit words
                    host = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                tcp[int(fields[9])] = (host, int(port, 16))
    unix: dict[int, str] = {}
    with open("/proc/net/unix") as f:
        for line in list(f)[1:]:
            fields = line.split()
            if len(fields) >= 8 and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
                unix[int(fields[6])] = fields[7]
    return tcp, unix


def listening_sockets(pid: int) -> tuple[list[tuple[str, int]], list[str]]:
    """(host, port) of every TCP socket and the path of every Unix socket that `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    tcp, unix = _listening_inodes()
    return sorted(tcp[i] for i in inodes if i in tcp), sorted(unix[i] for i in inodes if i in unix)


# ---------------------------------------------------------------------------------------- probes

def _multipart(body: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"written-once.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    return data, f"multipart/form-data; boundary={boundary}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


def _request(target: tuple[str, int] | str, method: str, path: str, body: bytes | None = None,
             content_type: str | None = None) -> tuple[int, bytes] | None:
    """(status, body) of one anonymous request; None when the server would not speak HTTP/1.1."""
    conn = (_UnixHTTPConnection(target) if isinstance(target, str)
            else http.client.HTTPConnection(target[0], target[1], timeout=5))
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def accepted_http_requests(target: tuple[str, int] | str, bucket: str, fid: str) -> list[str]:
    """Anonymous reads and writes of the object (as filer, S3, volume and master would name it) that
    the server did not refuse: any answer below 400 is a door left open."""
    obj = f"/buckets/{bucket}/{KEY}"
    s3 = f"/{bucket}/{KEY}"
    form, form_type = _multipart(FORGED)
    probes: list[tuple[str, str, bytes | None, str | None]] = [
        ("GET", obj, None, None), ("GET", s3, None, None), ("GET", f"/{fid}", None, None),
        ("GET", f"/dir/lookup?fileId={fid}&read=yes", None, None), ("GET", f"/dir/lookup?fileId={fid}", None, None),
        ("GET", "/dir/assign", None, None),
        ("PUT", obj, FORGED, "text/plain"), ("PUT", s3, FORGED, "text/plain"), ("PUT", f"/{fid}", FORGED, "text/plain"),
        ("POST", obj, form, form_type), ("POST", f"/buckets/{bucket}/locked/", form, form_type),
        ("POST", f"/{fid}", form, form_type), ("POST", "/submit", form, form_type),
        ("DELETE", obj, None, None), ("DELETE", f"/{fid}", None, None),
    ]
    accepted = []
    for method, path, body, content_type in probes:
        answer = _request(target, method, path, body, content_type)
        if answer is not None and answer[0] < 400:
            accepted.append(f"{method} {path} -> {answer[0]} {answer[1][:120]!r}")
    return accepted


def _answers_h2(sock: socket.socket) -> bool:
    """Send the HTTP/2 preface a gRPC client opens with; True when an HTTP/2 SETTINGS frame comes back."""
    try:
        sock.sendall(H2_PREFACE)
        reply = b""
        while len(reply) < 9:
            chunk = sock.recv(9 - len(reply))
            if not chunk:
                return False
            reply += chunk
        return reply[3] == 0x04  # frame type SETTINGS
    except OSError:  # ssl.SSLError included: the server asked for a certificate we do not have
        return False


def speaks_grpc_to_strangers(host: str, port: int) -> str | None:
    """How an anonymous gRPC client gets an HTTP/2 session on this port, or None if it cannot."""
    with socket.create_connection((host, port), timeout=5) as raw:
        if _answers_h2(raw):
            return "cleartext HTTP/2"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            if _answers_h2(tls):
                return "TLS without a client certificate"
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------- tests

def test_every_weed_port_listens_on_loopback(info: StackInfo) -> None:
    assert info.weed_pid is not None
    tcp, _ = listening_sockets(info.weed_pid)
    ports = {port for _, port in tcp}
    configured = {info.s3_port, *info.weed_ports.values()}
    assert configured <= ports, f"weed does not listen on {configured - ports}: found {tcp}"
    assert [(h, p) for h, p in tcp if h != "127.0.0.1"] == []


def test_anonymous_reads_and_writes_are_refused_on_every_weed_port(info: StackInfo, fid: str,
                                                                   farm_store: Store) -> None:
    assert info.weed_pid is not None
    tcp, unix = listening_sockets(info.weed_pid)
    targets: list[tuple[str, int] | str] = [*tcp, *unix]
    open_doors = {str(t): accepted for t in targets if (accepted := accepted_http_requests(t, info.bucket, fid))}
    assert open_doors == {}
    assert farm_store.get(KEY) == ORIGINAL


def test_grpc_ports_refuse_clients_without_the_stacks_certificate(info: StackInfo) -> None:
    assert info.weed_pid is not None
    tcp, _ = listening_sockets(info.weed_pid)
    grpc = {f"{h}:{p}": how for h, p in tcp if p != info.s3_port and (how := speaks_grpc_to_strangers(h, p))}
    assert grpc == {}


def test_the_weed_command_line_gets_nothing_without_the_stacks_files(info: StackInfo, fid: str, farm_store: Store,
                                                                     tmp_path: Path) -> None:
    """Real gRPC clients, run where no security.toml is found: an upload through the master, a read
    (`weed shell`) and an overwrite (`weed filer.copy`) through the filer."""
    home = tmp_path / "home"
    home.mkdir()
    forged = tmp_path / "written-once.txt"
    forged.write_bytes(FORGED)
    p = info.weed_ports
    env = {**os.environ, "HOME": str(home)}

    def weed(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        with contextlib.suppress(subprocess.TimeoutExpired):  # a client that cannot connect retries forever
            return subprocess.run([find_weed(), *args], env=env, cwd=tmp_path, input=stdin, capture_output=True,
                                  text=True, timeout=8, check=False)
        return subprocess.CompletedProcess(args, -1, "", "timed out")

    master = f"127.0.0.1:{p['master']}.{p['master_grpc']}"
    filer = f"127.0.0.1:{p['filer']}.{p['filer_grpc']}"
    upload = weed("upload", f"-master={master}", str(forged))
    assert '"fid"' not in upload.stdout, upload.stdout
    assert upload.returncode != 0, upload.stderr
    read = weed("shell", f"-master={master}", f"-filer={filer}", stdin=f"fs.cat /buckets/{info.bucket}/{KEY}\n")
    assert ORIGINAL.decode() not in read.stdout
    weed("filer.copy", str(forged), f"http://{filer}/buckets/{info.bucket}/locked/")
    assert farm_store.get(KEY) == ORIGINAL


def test_local_sockets_are_for_the_owner_only(info: StackInfo) -> None:
    assert info.weed_pid is not None
    _, unix = listening_sockets(info.weed_pid)
    assert unix, "weed listens on no Unix socket: the probe found nothing to check"
    shared = {path: oct(stat.S_IMODE(os.stat(path).st_mode)) for path in unix
              if stat.S_IMODE(os.stat(path).st_mode) & 0o077}
    assert shared == {}


def test_the_farm_still_reads_writes_lists_and_links(farm_store: Store, tmp_path: Path) -> None:
    import urllib.request

    key = f"checks/{uuid.uuid4().hex}"
    assert farm_store.put_if_absent(key + "/a.txt", b"first", "text/plain") is True
    assert farm_store.put_if_absent(key + "/a.txt", b"second", "text/plain") is False
    assert farm_store.get(key + "/a.txt") == b"first"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))  # boto3 sends it in parts
    farm_store.client.upload_file(str(big), farm_store.bucket, key + "/big.bin")
    back = tmp_path / "back.bin"
    farm_store.client.download_file(farm_store.bucket, key + "/big.bin", str(back))
    assert back.read_bytes() == big.read_bytes()
    assert sorted(farm_store.keys(key + "/")) == [key + "/a.txt", key + "/big.bin"]
    with urllib.request.urlopen(farm_store.presigned_get(key + "/a.txt", 60), timeout=10) as response:
        assert response.read() == b"first"
