"""The native API (/v1) of a real `sdfarm serve` on the embedded stack, with one real worker: batches in
as JSON or files in the four formats, the command line's problems, control, paging, server-sent
events, images with links; refusals (tokens, sizes, hostile bodies and paths) that leave Redis and
the bucket as they were."""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from sdfarm.errors import Problem
from sdfarm.settings import Settings
from sdfarm.store import Store
from tests.conftest import IDLE, OTHER_TOKEN, TINY, ApiServer, WorkerProcess, cli, wait_for
from tests.integration.test_submit import snapshot

UNKNOWN = "0123456789abcdef0123"  # a well-formed batch id no batch has
MAX_CONCURRENT = Settings.model_fields["api_max_concurrent"].default  # the `api` server's (not set there)
MAX_BODY = Settings.model_fields["api_max_body_bytes"].default


@pytest.fixture(scope="module")
def worker(start_worker: Callable[..., WorkerProcess], store: Store, tiny_assets: dict[str, Path]
           ) -> Iterator[WorkerProcess]:
    # a LoRA file, but not the one whose sha256 the registry names for this key: its job fails, with the reason
    store.client.put_object(Bucket=store.bucket, Key="models/loras/tampered.safetensors",
                            Body=tiny_assets["tiny-detail"].read_bytes())
    w = start_worker("api-native", model=TINY)
    yield w
    w.stop()  # the later modules' batches of TINY are their own workers'


def call(api: ApiServer, method: str, path: str, token: str | None = None, **kw: Any) -> requests.Response:
    return requests.request(method, api.url + path, headers={**api.headers(token), **kw.pop("headers", {})},
                            timeout=kw.pop("timeout", 30), **kw)


def upload(api: ApiServer, filename: str, text: str | bytes, **params: Any) -> requests.Response:
    return call(api, "POST", "/v1/batches", params=params, files={"file": (filename, text)})


def raw(api: ApiServer, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
        ) -> tuple[int, bytes]:
    """A request sent as written: no client normalises its path (`..`, `%2e`)."""
    host, port = urllib.parse.urlsplit(api.url).netloc.split(":")
    with closing(http.client.HTTPConnection(host, int(port), timeout=30)) as conn:
        conn.request(method, path, body=body, headers={**api.headers(), **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()


def sse(response: requests.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) of a text/event-stream, as they arrive."""
    event, data = "message", []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))
        elif not line and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


def events_until_end(api: ApiServer, batch_id: str, token: str | None = None, **params: Any
                     ) -> list[tuple[str, dict[str, Any]]]:
    with call(api, "GET", f"/v1/batches/{batch_id}/events", token, params=params, stream=True) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        seen = []
        for event in sse(r):
            seen.append(event)
            if event[0] == "end":
                return seen
    raise AssertionError(f"the stream closed without an end event: {seen}")


def cli_problems(result_stderr: str, path: Path, problems: list[dict[str, Any]]) -> None:
    """Each problem the API gave is a line the command line printed for the same file."""
    assert problems
    for p in problems:
        line = str(Problem(str(path), p["line"], p["item"], p["field"], p["message"]))
        assert line in result_stderr, f"{line!r} not in:\n{result_stderr}"


def test_every_native_route_is_documented_and_refuses_a_missing_or_wrong_token(api: ApiServer) -> None:
    doc = call(api, "GET", "/openapi.json").json()
    routes = {(method.upper(), path) for path, ops in doc["paths"].items() if path.startswith("/v1/")
              for method in ops}
    batch = "/v1/batches/{batch_id}"
    assert routes == {("POST", "/v1/batches"), ("GET", "/v1/batches"), ("GET", batch), ("GET", batch + "/events"),
                      ("GET", batch + "/images"), ("GET", "/v1/workers"), ("GET", "/v1/models"),
                      *(("POST", f"{batch}/{action}") for action in ("cancel", "pause", "resume", "retry",
                                                                     "reconcile"))}
    body = doc["paths"]["/v1/batches"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "items" in body["application/json"]["schema"]["properties"]
    for name in ("Submitted", "DryRun", "Problems", "BatchDetail", "BatchPage", "ImagePage", "Workers", "Models"):
        assert name in doc["components"]["schemas"], name
    for method, path in sorted(routes):
        url = path.replace("{batch_id}", UNKNOWN)
        for headers in ({}, {"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"}):
            r = requests.request(method, api.url + url, headers=headers, json={"items": ["a"]}, timeout=10)
            assert r.status_code == 401, (method, url, r.status_code, r.text)


def test_an_unknown_batch_is_404_everywhere(api: ApiServer) -> None:
    for method, suffix in (("GET", ""), ("GET", "/images"), ("GET", "/events"), ("POST", "/cancel"),
                           ("POST", "/pause"), ("POST", "/resume"), ("POST", "/retry"), ("POST", "/reconcile")):
        r = call(api, method, f"/v1/batches/{UNKNOWN}{suffix}")
        assert r.status_code == 404, (suffix, r.text)
        assert f"unknown batch '{UNKNOWN}'" in r.json()["detail"]


def test_hostile_requests_get_a_clear_4xx_and_change_nothing(
        api: ApiServer, redis_client: redis.Redis, store: Store) -> None:
    before = snapshot(redis_client, store)
    post = "/v1/batches"
    # malformed, deep and undecodable JSON: the batch file's own problems
    for body, expected in ((b'{"items": [', "malformed JSON"), (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                           (b'{"items": ["\xff"]}', "not UTF-8 text")):
        r = call(api, "POST", post, data=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["problems"][0]["message"].startswith(expected)
    # wrong content types
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
        r = call(api, "POST", post, data=b"items: [a]", headers=headers)
        assert r.status_code == 415, (headers, r.text)
        assert "application/json" in r.json()["detail"]
    # uploads: no file, a file of another type, two files, a file name with a path in it
    r = call(api, "POST", post, files={"other": ("a.yaml", "items: [a]")})
    assert (r.status_code, r.json()["detail"]) == (422, "expected a batch file in the multipart field 'file'")
    r = upload(api, "batch.exe", "items: [a]")
    assert r.status_code == 422
    assert r.json()["problems"][0]["message"] == \
        "unknown file type '.exe' (allowed: .yaml, .yml, .json, .jsonl, .csv, .txt)"
    r = call(api, "POST", post, files=[("file", ("a.txt", "a")), ("file", ("b.txt", "b"))])
    assert r.status_code == 400
    r = upload(api, "../../etc/passwd.yaml", f"items: [{{model: {IDLE}, prompt: a, width: 100}}]\n")
    assert r.status_code == 422
    assert {p["source"] for p in r.json()["problems"]} == {"passwd.yaml"}
    # bad queries
    assert call(api, "POST", post, json={"items": ["a"]}, params={"priority": 10}).status_code == 422
    r = call(api, "POST", post, json={"items": [{"model": IDLE, "prompt": "a"}]}, params={"name": "x\x1b[2J"})
    assert r.status_code == 422
    assert r.json()["problems"][0]["field"] == "name"
    # bodies over the cap: announced by Content-Length, or sent without one
    status, text = raw(api, "POST", post, {"Content-Type": "application/json", "Content-Length": str(MAX_BODY + 1)},
                       b"{")
    assert status == 413, text
    chunks = (b"x" * 2**20 for _ in range(MAX_BODY // 2**20 + 1))
    r = call(api, "POST", post, data=chunks, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413
    # path tricks: refused by the route or its id pattern, never a key
    for path in ("/v1/batches/..%2F..%2Fetc%2Fpasswd", "/v1/batches/%2e%2e", "/v1/batches/%2e%2e/cancel",
                 "/v1/batches/../../healthz", f"/v1/batches/{UNKNOWN.upper()}", "/v1/batches/abc",
                 f"/v1/batches/{'a' * 65}/images", f"/v1/batches/{UNKNOWN}%00", f"/v1/batches/{UNKNOWN}%2F..%2F..",
                 f"/v1/batches/{UNKNOWN}/../../batches"):
        method = "POST" if path.endswith("/cancel") else "GET"
        status, text = raw(api, method, path)
        assert status in (404, 405, 422), (path, status, text)
        assert b"unknown batch" not in text  # nothing looked the id up
    assert snapshot(redis_client, store) == before


def test_refused_batches_carry_the_command_lines_problems_and_nothing_is_written(
        api: ApiServer, env: dict[str, str], tmp_path: Path, redis_client: redis.Redis, store: Store) -> None:
    yaml_text = (f"defaults: {{model: {IDLE}}}\nitems:\n  - a fine prompt\n  - {{prompt: b, width: 100}}\n"
                 "  - {prompt: c, model: ../../etc/passwd}\n  - {prompt: d, sampler: Euler b}\n")
    json_text = json.dumps({"defaults": {"model": IDLE}, "items": ["fine", {"prompt": "b", "steps": -1},
                                                                   {"prompt": "c", "colour": "red"}]}, indent=1)
    before = snapshot(redis_client, store)
    r = upload(api, "bad.yaml", yaml_text)
    assert r.status_code == 422
    assert r.json()["detail"] == "3 problems in batch; nothing was enqueued"
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text(yaml_text)
    result = cli(["submit", str(yaml_file)], env)
    assert result.returncode == 2
    cli_problems(result.stderr, yaml_file, r.json()["problems"])

    r = call(api, "POST", "/v1/batches", data=json_text, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    json_file = tmp_path / "request.json"  # the name a JSON body's problems give it
    json_file.write_text(json_text)
    result = cli(["submit", str(json_file)], env)
    assert result.returncode == 2
    cli_problems(result.stderr, json_file, r.json()["problems"])
    assert {p["line"] for p in r.json()["problems"]} != {None}  # lines of the body, as of a file

    # the API's own cap on jobs, counted before any job is validated
    r = call(api, "POST", "/v1/batches", json={"items": [{"model": IDLE, "prompt": "a", "count": 10_000,
                                                          "matrix": {"steps": list(range(1, 12))}}]})
    assert r.status_code == 422
    assert r.json()["problems"][0]["message"] == ("the batch expands to more than 100000 jobs (allowed: at most"
                                                  " 100000 through the API, SDFARM_API_MAX_JOBS; larger batches:"
                                                  " `sdfarm submit`)")
    assert snapshot(redis_client, store) == before


FILES = {
    "plan.yaml": f"defaults: {{model: {IDLE}, width: 64, height: 64}}\nitems: [{{prompt: a, count: 5}}, "
                 "{prompt: b, width: 128}]\n",
    "plan.jsonl": "".join(json.dumps({"model": IDLE, "prompt": p, "width": 64, "height": 64}) + "\n" for p in "abc"),
    "plan.csv": f"model,prompt,width,height,seed\n{IDLE},a,64,64,1\n{IDLE},b,64,64,2\n",
    "plan.txt": "# one prompt a line\na red fox\na blue fox\n\na green fox\na grey fox\n",
}


def test_files_in_each_format_plan_as_the_command_line_plans_them(
        api: ApiServer, env: dict[str, str], tmp_path: Path, redis_client: redis.Redis, store: Store) -> None:
    before = snapshot(redis_client, store)
    plans = {}
    for name, text in FILES.items():
        extra = {"model": IDLE, "name": "prompts"} if name == "plan.txt" else {}  # a .txt file holds prompts only
        r = upload(api, name, text, dry_run="true", **extra)
        assert r.status_code == 200, (name, r.text)
        plans[name] = r.json()
    assert {name: p["jobs"] for name, p in plans.items()} == {"plan.yaml": 6, "plan.jsonl": 3, "plan.csv": 2,
                                                              "plan.txt": 4}
    assert plans["plan.txt"]["name"] == "prompts"
    assert all(p["dry_run"] and re.fullmatch("[0-9a-f]{20}", p["batch_id"]) for p in plans.values())
    path = tmp_path / "plan.yaml"
    path.write_text(FILES["plan.yaml"])
    result = cli(["submit", str(path), "--dry-run"], env)
    assert result.returncode == 0, result.stderr
    assert plans["plan.yaml"]["plan"] in result.stdout  # the same batch id, jobs, chunks and queues
    assert "6 jobs, 3 chunks of up to 4" in plans["plan.yaml"]["plan"]
    assert snapshot(redis_client, store) == before  # a dry run enqueues nothing


def queued_at(r: redis.Redis, model: str, level: int) -> int:
    return int(r.llen(f"render.{model}:{level}" if level else f"render.{model}"))


def test_an_uploaded_batch_is_paused_resumed_and_cancelled(api: ApiServer, redis_client: redis.Redis) -> None:
    before = queued_at(redis_client, IDLE, 9 - 7)
    r = upload(api, "controlled.yaml", f"defaults: {{model: {IDLE}, width: 64, height: 64}}\n"
                                       "items: [{prompt: held back, count: 5}]\n", priority=7)
    assert r.status_code == 200, r.text
    submitted = r.json()
    batch_id = submitted["batch_id"]
    assert submitted == {"batch_id": batch_id, "name": "controlled", "jobs": 5, "chunks_enqueued": 2,
                         "already_done": 0, "priority": 7, "state": "active"}
    assert queued_at(redis_client, IDLE, 9 - 7) == before + 2  # priority 7 is the broker's level 2

    def status() -> dict[str, Any]:
        got = call(api, "GET", f"/v1/batches/{batch_id}")
        assert got.status_code == 200, got.text
        return dict(got.json())

    first = status()
    assert (first["status"], first["total"], first["queued"], first["done"]) == ("running", 5, 5, 0)
    assert first["name"] == "controlled"
    assert first["eta_s"] is None  # nothing rendered: no rate yet
    assert call(api, "POST", f"/v1/batches/{batch_id}/pause").json() == {"batch_id": batch_id, "state": "paused"}
    assert (status()["state"], status()["status"]) == ("paused", "paused")
    r = call(api, "POST", f"/v1/batches/{batch_id}/reconcile")
    assert r.status_code == 422
    assert f"batch {batch_id} is paused" in r.json()["detail"]
    resumed = call(api, "POST", f"/v1/batches/{batch_id}/resume").json()
    assert resumed == {"batch_id": batch_id, "state": "active", "total": 5, "done": 0, "failed": 0,
                       "enqueued_jobs": 5, "chunks": 2}
    assert status()["status"] == "running"
    assert call(api, "POST", f"/v1/batches/{batch_id}/cancel").json() == {"batch_id": batch_id,
                                                                         "state": "cancelled"}
    assert status()["status"] == "cancelled"
    events = events_until_end(api, batch_id)
    assert [e for e, _ in events] == ["progress", "end"]
    assert events[-1][1]["reason"] == "cancelled"
    assert events[-1][1]["batch"]["done"] == 0


def test_event_streams_beat_end_in_time_and_free_their_slot_when_the_client_goes(
        api: ApiServer, redis_client: redis.Redis) -> None:
    r = call(api, "POST", "/v1/batches", json={"name": "streamed", "items": [
        {"model": IDLE, "prompt": "never rendered", "width": 64, "height": 64}]})
    batch_id = r.json()["batch_id"]
    try:
        events = events_until_end(api, batch_id, heartbeat_s=1, timeout_s=2.5)
        kinds = [e for e, _ in events]
        assert (kinds[0], kinds[-1]) == ("progress", "end")
        assert set(kinds[1:-1]) == {"heartbeat"}, kinds  # nothing moved: heartbeats, one a second
        assert events[0][1]["batch_id"] == batch_id
        assert events[-1][1]["reason"] == "timeout"
        # each open stream holds one of its token's requests in flight, until its client goes away
        streams = [call(api, "GET", f"/v1/batches/{batch_id}/events", OTHER_TOKEN, stream=True)
                   for _ in range(MAX_CONCURRENT)]
        readers = [sse(s) for s in streams]  # kept: a reader dropped closes its stream
        try:
            for reader in readers:
                assert next(reader)[0] == "progress"
            assert call(api, "GET", "/v1/workers", OTHER_TOKEN).status_code == 429
            assert call(api, "GET", "/v1/workers").status_code == 200  # another token's are its own
        finally:
            for s in streams:
                s.close()
        wait_for(lambda: call(api, "GET", "/v1/workers", OTHER_TOKEN).status_code == 200, 10,
                 "the closed streams to give back their slots")
    finally:
        call(api, "POST", f"/v1/batches/{batch_id}/cancel")


def test_a_json_batch_renders_with_live_events_images_failures_and_retry(
        api: ApiServer, worker: WorkerProcess, store: Store) -> None:
    batch = {"name": "api-render", "seed": 11, "defaults": {"model": TINY, "width": 64, "height": 64, "steps": 2},
             "items": [{"prompt": "a red fox", "count": 2}, {"prompt": "a fox", "loras": ["s3-tampered"]}]}
    r = call(api, "POST", "/v1/batches", json=batch)
    assert r.status_code == 200, r.text
    batch_id = r.json()["batch_id"]
    assert r.json()["jobs"] == 3

    events = events_until_end(api, batch_id, heartbeat_s=5, timeout_s=120)
    kinds = [e for e, _ in events]
    assert (kinds[0], kinds[-1]) == ("progress", "end"), kinds
    moved = [d["done"] + d["failed"] for e, d in events if e == "progress"]
    assert moved == sorted(moved)
    end = events[-1][1]
    assert end["reason"] == "finished", worker.tail()
    assert (end["batch"]["done"], end["batch"]["failed"], end["batch"]["status"]) == (2, 1, "failed")

    detail = call(api, "GET", f"/v1/batches/{batch_id}").json()
    assert (detail["total"], detail["done"], detail["failed"], detail["queued"]) == (3, 2, 1, 0)
    assert (detail["images_per_s"], detail["eta_s"], detail["finished"]) == (0.0, 0.0, True)
    [failure] = detail["failures"]
    assert failure["index"] == 2
    assert "lora 's3-tampered'" in failure["reason"]
    assert failure["worker"] == worker.hostname
    assert call(api, "GET", f"/v1/batches/{batch_id}", params={"failures": 0}).json()["failures"] == []

    page = call(api, "GET", f"/v1/batches/{batch_id}/images").json()
    assert (page["total"], page["next_offset"]) == (2, None)
    assert [(i["index"], i["prompt"]) for i in page["images"]] == [(0, "a red fox"), (1, "a red fox")]
    first = page["images"][0]
    assert first["seed"] != page["images"][1]["seed"]
    assert first["infotext"].startswith("a red fox\n")
    assert f"Seed: {first['seed']}" in first["infotext"]
    assert (first["width"], first["height"], first["model"]) == (64, 64, TINY)
    png = requests.get(first["image_url"], timeout=10)
    assert png.status_code == 200
    assert png.content.startswith(b"\x89PNG")
    assert len(png.content) == first["bytes"]
    assert requests.get(first["sidecar_url"], timeout=10).json()["job_id"] == first["job_id"]
    if first["thumbnail_url"] is not None:  # workers that write thumbnails
        assert requests.get(first["thumbnail_url"], timeout=10).content[8:12] == b"WEBP"
    one = call(api, "GET", f"/v1/batches/{batch_id}/images", params={"limit": 1, "offset": 1}).json()
    assert ([i["index"] for i in one["images"]], one["next_offset"]) == ([1], None)
    assert call(api, "GET", f"/v1/batches/{batch_id}/images", params={"limit": 1}).json()["next_offset"] == 1

    assert call(api, "POST", f"/v1/batches/{batch_id}/retry").json() == {"batch_id": batch_id, "retried": 1}
    again = events_until_end(api, batch_id, timeout_s=120)
    assert again[-1][1]["reason"] == "finished"
    assert (again[-1][1]["batch"]["done"], again[-1][1]["batch"]["failed"]) == (2, 1)  # tampered still
    reconciled = call(api, "POST", f"/v1/batches/{batch_id}/reconcile").json()
    assert (reconciled["done"], reconciled["failed"], reconciled["enqueued_jobs"]) == (2, 1, 0)


def test_batches_are_listed_newest_first_a_page_at_a_time(api: ApiServer) -> None:
    submitted = [call(api, "POST", "/v1/batches", json={"name": f"listed-{n}", "items": [
        {"model": IDLE, "prompt": "listed", "width": 64, "height": 64}]}).json()["batch_id"] for n in range(3)]
    everything = call(api, "GET", "/v1/batches", params={"limit": 100}).json()
    ids = [b["batch_id"] for b in everything["batches"]]
    assert ids[:3] == submitted[::-1]
    times = [b["submitted_at"] for b in everything["batches"]]
    assert times == sorted(times, reverse=True)
    pages = [call(api, "GET", "/v1/batches", params={"limit": 2, "offset": o}).json() for o in (0, 2)]
    assert [b["batch_id"] for p in pages for b in p["batches"]] == ids[:4]
    assert pages[0]["next_offset"] == 2
    assert call(api, "GET", "/v1/batches", params={"limit": 101}).status_code == 422


def test_workers_and_models(api: ApiServer, worker: WorkerProcess) -> None:
    beats = call(api, "GET", "/v1/workers").json()["workers"]
    mine = next(b for b in beats if b["hostname"] == worker.hostname)
    assert (mine["model"], mine["device"]) == (TINY, "cpu")
    registry = call(api, "GET", "/v1/models").json()
    tiny = next(m for m in registry["models"] if m["name"] == TINY)
    assert re.fullmatch("[0-9a-f]{64}", tiny["sha256"])
    assert tiny["family"] == "sd15"
    kinds = {(a["kind"], a["name"]): a for a in registry["assets"]}
    assert kinds[("lora", "s3-detail")]["source"].endswith("/models/loras/detail.safetensors")
    assert kinds[("upscaler", "tiny-esrgan")]["family"] is None
