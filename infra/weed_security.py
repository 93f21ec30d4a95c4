"""The embedded SeaweedFS's keys: a `security.toml` in the folder weed runs in (weed reads
./security.toml first), generated once per stack and kept, so a restarted weed trusts the same
certificate and keys.

- gRPC (master, volume, filer, S3 IAM cache): mutual TLS. One CA signs one certificate that every
  component serves and presents as a client; the CA's private key is deleted once it has signed, so
  nothing can issue another. A client without the certificate gets no HTTP/2 session.
- Volume HTTP: writes and reads need a JWT signed with keys only the master and volume know; the
  master hands them out over gRPC only (its HTTP API is off, `weed server -disableHttp`).
- Filer HTTP: off as well (-disableHttp); its JWT keys are set anyway, so turning it back on does
  not open it.
The S3 port itself checks the access key (s3.json). Files are 0600 in a 0700 folder.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from pathlib import Path

SECURITY_FILE = "security.toml"
_TLS = "tls"
_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "client")
_EXTENSIONS = ("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
               "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")


class SecurityError(RuntimeError):
    """The keys could not be made (raised as the stack's StackError by its caller)."""


def _openssl(folder: Path, *args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SecurityError("no openssl on PATH: the embedded S3 server's gRPC ports need a certificate "
                            "(install openssl)")
    done = subprocess.run([openssl, *args], cwd=folder, capture_output=True, text=True, umask=0o077, check=False)
    if done.returncode != 0:
        raise SecurityError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")


def _make_certificate(tls: Path) -> None:
    """ca.pem, and node.pem + node.key signed by it (EC P-256, 10 years)."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(tls, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650",
             "-subj", "/CN=sdfarm embedded stack CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl(tls, "req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=sdfarm embedded stack")
    (tls / "node.ext").write_text(_EXTENSIONS)
    _openssl(tls, "x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-set_serial", "0x" + secrets.token_hex(16), "-days", "3650", "-extfile", "node.ext", "-out", "node.pem")
    for used in ("ca.key", "node.csr", "node.ext"):
        (tls / used).unlink()


def _toml(tls: Path) -> str:
    def quoted(path: Path) -> str:
        return json.dumps(str(path))  # a JSON string is a TOML basic string

    lines = []
    for section in _JWT_SECTIONS:
        lines += [f"[{section}]", f'key = "{secrets.token_hex(32)}"', "expires_after_seconds = 10", ""]
    lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false", "",
              "[grpc]", f"ca = {quoted(tls / 'ca.pem')}", ""]
    for component in _GRPC_COMPONENTS:
        lines += [f"[grpc.{component}]", f"cert = {quoted(tls / 'node.pem')}", f"key = {quoted(tls / 'node.key')}", ""]
    return "\n".join(lines)


def ensure_security(folder: Path) -> Path:
    """folder/security.toml and the certificate it names; made once, then reused."""
    config = folder / SECURITY_FILE
    tls = folder / _TLS
    if config.is_file() and all((tls / name).is_file() for name in ("ca.pem", "node.pem", "node.key")):
        return config
    if tls.exists():
        shutil.rmtree(tls)
    tls.mkdir(mode=0o700)
    _make_certificate(tls)
    partial = folder / (SECURITY_FILE + ".partial")
    partial.write_text(_toml(tls))
    partial.chmod(0o600)
    partial.replace(config)
    return config
