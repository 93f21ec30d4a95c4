"""Hostile input through the real command line, against the real stack: each file is refused with
exit 2 and its message in at most 5 s and 500 MB (the producer's own peak RSS, from wait4), and
Redis and the bucket are left as they were. Wrong settings and credentials get one line that says
what to fix, never a traceback and never a secret. Links are SigV4."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from infra.stack import StackInfo
from sdfarm.errors import printable
from sdfarm.progress import ProgressBoard
from sdfarm.store import Store
from tests.conftest import IDLE, ROOT, cli
from tests.integration.test_submit import snapshot

MAX_SECONDS = 5.0
MAX_RSS_BYTES = 500 * 1024 * 1024


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int  # bytes


# Started from a small interpreter, not from pytest: a child's peak RSS (wait4's ru_maxrss) counts the
# memory of whatever it was forked from before its exec, and this test process holds torch.
_MEASURE = """
import os, sys, time
out = sys.argv[1]
start = time.monotonic()
pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "producer", *sys.argv[2:]], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {time.monotonic() - start} {usage.ru_maxrss * 1024}")
"""


def run_cli(args: list[str], env: dict[str, str], tmp: Path) -> Run:
    """`python -m producer ARGS` in a fresh process, with its wall time and its own peak RSS."""
    result = tmp / "measured"
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(result), *args], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    code, seconds, rss = result.read_text().split()
    return Run(int(code), proc.stdout, proc.stderr, float(seconds), int(rss))


def hostile_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a line its refusal must hold)."""
    files: dict[str, tuple[Path, str]] = {}

    def add(name: str, text: str | bytes, expected: str) -> None:
        path = folder / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        files[name] = (path, expected)

    laughs = "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    add("aliases.yaml", f'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n{laughs}'
        f"items:\n  - {{model: {IDLE}, prompt: *i}}\n", "the document holds more than 250000 values, aliases expanded")
    assert len(files["aliases.yaml"][0].read_bytes()) < 500  # the 430-byte file, give or take
    add("lines.txt", b"ab\n" * 15_000_000, "the batch expands to more than 1000000 jobs")
    add("deep.json", '{"items": [' + "[" * 100_000 + "]" * 100_000 + "]}", "nested too deeply")
    add("deep.yaml", "items: " + "[" * 900 + "]" * 900, "nested more than 32 levels deep")
    add("digits.yaml", f"items:\n  - {{model: {IDLE}, prompt: a, seed: {'9' * 5000}}}\n",
        "an integer of 5000 digits (allowed: at most 100)")
    add("infinite.json", f'{{"items": [{{"model": "{IDLE}", "prompt": "a", "seed": 1e999}}]}}',
        "seed: inf is not allowed")
    widths = ", ".join(str(64 + 8 * i) for i in range(200))
    add("explosion.yaml", f"items:\n  - {{model: {IDLE}, prompt: a, count: 10000, matrix: {{width: [{widths}],"
        f" height: [{widths}], steps: [{', '.join(str(i) for i in range(1, 151))}]}}}}\n",
        "the batch expands to more than 1000000 jobs")
    add("flood.jsonl", f'{{"model": "{IDLE}", "prompt": "a", "width": 100}}\n' * 1_000_000,
        "at least 1000 problems in batch (validation stopped there)")
    add("nuls.txt", "a\x00\n" * 1_000_000, "prompt: control character U+0000 (NUL) at character 2")
    add("escapes.yaml", f"items:\n  - {{model: {IDLE}, prompt: a, \"\\e]0;pwned\\a\\e[2J\": 1}}\n",
        "\\x1b]0;pwned\\x07\\x1b[2J: unknown field")
    add("control.csv", f"model,prompt\n{IDLE},\"a\x00b\"\n", "prompt: control character U+0000 (NUL) at character 2")
    add("dupes.csv", f"model,prompt,steps,steps\n{IDLE},a,20,150\n", "steps: duplicate column (columns 3 and 4")
    zero = folder / "zero.yaml"
    zero.symlink_to("/dev/zero")
    files["zero.yaml"] = (zero, "file is a character device (allowed: a regular file)")
    fifo = folder / "fifo.txt"
    os.mkfifo(fifo)
    files["fifo.txt"] = (fifo, "file is a FIFO (allowed: a regular file)")
    return files


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return hostile_files(tmp_path_factory.mktemp("hostile"))


CASES = ["aliases.yaml", "lines.txt", "deep.json", "deep.yaml", "digits.yaml", "infinite.json", "explosion.yaml",
         "flood.jsonl", "nuls.txt", "escapes.yaml", "control.csv", "dupes.csv", "zero.yaml", "fifo.txt"]


@pytest.mark.parametrize("name", CASES)
def test_a_hostile_file_is_refused_quickly_in_little_memory_and_changes_nothing(
        name: str, hostile: dict[str, tuple[Path, str]], tmp_path: Path, env: dict[str, str],
        redis_client: redis.Redis, store: Store) -> None:
    path, expected = hostile[name]
    before = snapshot(redis_client, store)
    run = run_cli(["submit", str(path)], env, tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert expected in run.stderr, run.stderr[-3000:]
    assert "nothing was enqueued" in run.stderr
    assert "Traceback" not in run.stderr
    assert printable(run.stderr, newlines=True) == run.stderr
    assert len(run.stderr.splitlines()) <= 53
    assert run.seconds <= MAX_SECONDS, f"{name}: {run.seconds:.1f} s"
    assert run.peak_rss <= MAX_RSS_BYTES, f"{name}: {run.peak_rss / 2**20:.0f} MiB"
    assert snapshot(redis_client, store) == before


def test_hostile_dataset_specs_and_inputs_are_refused_quickly(
        tmp_path: Path, env: dict[str, str], redis_client: redis.Redis, store: Store) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: animals\ntemplates: ['{animal:>100000000}']\nwildcards: {animal: [cat]}\n"
                    f"images_per_run: 1000\nrender: {{model: {IDLE}}}\n")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    os.mkfifo(inputs / "cat.png")
    batch = tmp_path / "img2img.yaml"
    batch.write_text(f"items:\n  - {{model: {IDLE}, prompt: a, init_image: 'local:cat.png'}}\n")
    before = snapshot(redis_client, store)
    for args, extra, expected in (
            (["dataset", "run", str(spec)], {}, "uses {animal:>100000000} (allowed: {name} only"),
            (["submit", str(batch)], {"SDFARM_INPUTS_DIR": str(inputs)},
             "init_image: 'local:cat.png': is a FIFO (allowed: a regular file)")):
        run = run_cli(args, {**env, **extra}, tmp_path)
        assert run.returncode == 2, run.stderr
        assert expected in run.stderr
        assert run.seconds <= MAX_SECONDS
        assert run.peak_rss <= MAX_RSS_BYTES
    assert snapshot(redis_client, store) == before


def valid_batch(tmp_path: Path) -> Path:
    path = tmp_path / "fine.yaml"
    path.write_text(f"defaults: {{model: {IDLE}, width: 64, height: 64}}\nitems: [a fine prompt]\n")
    return path


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_wrong_s3_secret_or_key_id_says_which_and_never_prints_the_secret(
        tmp_path: Path, env: dict[str, str], stack_info: StackInfo, redis_client: redis.Redis, store: Store) -> None:
    batch = valid_batch(tmp_path)
    wrong = "wrong-secret-" + "x" * 20
    before = snapshot(redis_client, store)
    line = one_line_error(cli(["submit", str(batch)], {**env, "SDFARM_S3_SECRET_ACCESS_KEY": wrong}))
    assert "the secret key does not match access key id" in line
    assert "check SDFARM_S3_SECRET_ACCESS_KEY" in line
    line = one_line_error(cli(["submit", str(batch)], {**env, "SDFARM_S3_ACCESS_KEY_ID": "NOSUCHKEY"}))
    assert "it does not know access key id 'NOSUCHKEY' (SDFARM_S3_ACCESS_KEY_ID)" in line
    for secret in (wrong, stack_info.s3_secret_key):
        assert secret not in line
    assert snapshot(redis_client, store) == before


def test_malformed_settings_name_the_variable_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    batch = valid_batch(tmp_path)
    line = one_line_error(cli(["submit", str(batch)], {**env, "SDFARM_REDIS_URL": "redis://:sec/ret@localhost:x/0"}))
    assert line.startswith("error: SDFARM_REDIS_URL is not a Redis URL: it does not parse (allowed: redis://")
    assert "sec" not in line.replace("percent-encode", "")
    line = one_line_error(cli(["status"], {**env, "SDFARM_REDIS_URL": "http://localhost:6379"}))
    assert "SDFARM_REDIS_URL is not a Redis URL: it must start with redis://, rediss://, unix:// or sentinel://" in line
    line = one_line_error(cli(["submit", str(batch)], {**env, "SDFARM_CHUNK_SIZE": "0", "SDFARM_UPLOAD_THREADS": "x"}))
    assert line == ("error: SDFARM_CHUNK_SIZE: Input should be greater than or equal to 1 (got '0');"
                    " SDFARM_UPLOAD_THREADS: Input should be a valid integer, unable to parse string as an integer"
                    " (got 'x')")
    line = one_line_error(cli(["submit", str(batch)], {**env, "SDFARM_S3_ENDPOINT_URL": "not a url"}))
    assert line.startswith("error: SDFARM_S3_ENDPOINT_URL 'not a url' is not a URL (allowed: http://HOST:PORT")
    result = cli(["submit", str(batch), "--set", "prompt=[unclosed"], env)
    assert result.returncode == 2
    assert "Invalid value for --set: 'prompt=[unclosed': malformed YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wrong_redis_password_is_a_message(tmp_path: Path, env: dict[str, str], stack_info: StackInfo) -> None:
    url = env["SDFARM_REDIS_URL"].replace(stack_info.redis_password, "not-the-password")
    line = one_line_error(cli(["status"], {**env, "SDFARM_REDIS_URL": url}))
    assert line == "error: Redis refused the password in SDFARM_REDIS_URL (redis://:PASSWORD@HOST:PORT/DB)"


def test_status_escapes_a_batch_name_written_before_names_were_checked(
        env: dict[str, str], board: ProgressBoard) -> None:
    board.register("e5c" * 6 + "00", "\x1b[2J[red]x\x07", 1)
    result = cli(["status", "--limit", "100"], env)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "\\x1b[2J[red]x\\x07" in result.stdout  # escaped, and not read as markup


def test_links_are_sigv4_and_work(store: Store) -> None:
    key = "tests/presigned/hello.txt"
    store.put_if_absent(key, b"hello, SigV4", "text/plain")
    url = store.presigned_get(key, 120)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
    assert "X-Amz-Signature=" in url
    assert "X-Amz-Expires=120" in url
    assert "AWSAccessKeyId=" not in url  # SigV2's form
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"hello, SigV4"
    signature = url.split("X-Amz-Signature=")[1][:64]
    tampered = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(tampered, timeout=10)
    assert info.value.code == 403
