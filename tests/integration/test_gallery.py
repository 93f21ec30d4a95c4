"""The gallery (producer/api/gallery.py) on a real `sdfarm serve`, the embedded stack and a real
worker: in headless Chromium (Debian's `chromium`, driven by Playwright; `make debian-tools` installs it),
log in, open a batch, see its thumbnails, open an image and read its prompt, cancel a running batch
and see it stop; over plain HTTP, prompts rendered as text, the control forms and their checks,
thumbnails proxied (and made for an image stored without one)."""

from __future__ import annotations

import io
import json
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from PIL import Image

from producer.browse import PAGE_SIZE, is_set
from sdfarm.batchfile import BatchPlan, plan_file
from sdfarm.layout import image_key, sidecar_key, thumbnail_key
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.queue import queue_depth
from sdfarm.store import Store
from tests.conftest import IDLE, TINY, ApiServer, WorkerProcess, cli, start_services, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

HOSTILE = '<script>alert("prompt")</script><img src=x onerror=alert(1)> & \'quoted\' "text"'
CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


@pytest.fixture(scope="module")
def gallery_worker(start_worker: Callable[..., WorkerProcess]) -> Iterator[WorkerProcess]:
    worker = start_worker("gallery-a", model=TINY)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Headless Chromium: Debian's build (browsers cannot be downloaded here), driven by Playwright."""
    held: dict[str, Any] = {}

    def start() -> None:
        from playwright.sync_api import sync_playwright

        executable = shutil.which("chromium")
        if executable is None:
            raise RuntimeError("Debian's chromium is not installed (`make debian-tools`)")
        held["playwright"] = sync_playwright().start()
        held["browser"] = held["playwright"].chromium.launch(executable_path=executable, headless=True)

    def stop() -> None:
        if "browser" in held:
            held.pop("browser").close()
        if "playwright" in held:
            held.pop("playwright").stop()

    start_services("headless chromium", start, stop)
    yield held["browser"]
    stop()


@pytest.fixture
def dialogs() -> list[str]:
    """The messages of the dialogs (alert, confirm) the page opened; each was accepted."""
    return []


@pytest.fixture
def page(chromium: Browser, api: ApiServer, dialogs: list[str]) -> Iterator[Page]:
    context = chromium.new_context(base_url=api.url)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=api.url)
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    tab.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    yield tab
    context.close()


def write_batch(tmp_path: Path, name: str, items: list[str], steps: int = 2, model: str = TINY) -> Path:
    path = tmp_path / f"{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(f"name: {json.dumps(name)}\nseed: 11\n"
                    f"defaults: {{model: {model}, width: 64, height: 64, steps: {steps}}}\n"
                    "items:\n" + "".join(f"  - {item}\n" for item in items))
    return path


def submitted(path: Path, env: dict[str, str], registry: Registry) -> BatchPlan:
    result = cli(["submit", str(path)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    return plan_file(path, registry, 1000)


def gallery_session(api: ApiServer) -> requests.Session:
    """Logged in as a browser would be: the token posted once, then the session cookie."""
    session = requests.Session()
    r = session.post(api.url + "/login", data={"token": api.token}, headers={"Origin": api.url},
                     allow_redirects=False, timeout=10)
    assert r.status_code == 303
    return session


def log_in(page: Page, api: ApiServer) -> None:
    from playwright.sync_api import expect

    page.goto("/")
    expect(page).to_have_url(f"{api.url}/login?next=%2F")
    page.fill("#token", "not-the-token-" + "x" * 10)
    page.click("form.login button")
    expect(page.locator("form.login .error")).to_have_text("That token is not valid.")
    page.fill("#token", api.token)
    page.click("form.login button")
    expect(page).to_have_url(f"{api.url}/")


def loaded(page: Page, selector: str) -> int:
    """How many of the images matching `selector` the browser has decoded."""
    count: int = page.eval_on_selector_all(selector,
                                           "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length")
    return count


def test_a_browser_logs_in_opens_a_batch_sees_its_thumbnails_and_reads_an_image(
        tmp_path: Path, gallery_worker: WorkerProcess, api: ApiServer, env: dict[str, str], store: Store,
        registry: Registry, page: Page, dialogs: list[str]) -> None:
    from playwright.sync_api import expect

    tag = uuid.uuid4().hex[:6]
    prompts = [json.dumps(HOSTILE + f" {tag}"), f"a lighthouse {tag}", f"a red fox {tag}", f"an origami owl {tag}"]
    # a fifth job that fails where it renders: its LoRA's bytes in the bucket are not the registered ones
    failing = f"{{prompt: a moth {tag}, loras: [s3-tampered]}}"
    plan = submitted(write_batch(tmp_path, f"gallery {tag}", [*prompts, failing]), env, registry)
    good, bad = plan.jobs[:4], plan.jobs[4]

    log_in(page, api)
    row = page.locator(f'tr[data-batch="{plan.batch_id}"]')
    expect(row.locator("a")).to_have_text(f"gallery {tag}")
    # the progress bar moves while the page stays open (no reload)
    expect(row.locator('[data-field="state"]')).to_have_text("finished", timeout=120_000)
    expect(row.locator('[data-field="done"]')).to_have_text("4")
    expect(row.locator('[data-field="failed"]')).to_have_text("1")
    assert row.locator("progress").evaluate("p => [p.value, p.max]") == [5, 5]

    row.locator("a").click()
    expect(page).to_have_url(f"{api.url}/batches/{plan.batch_id}")
    thumbs = page.locator("img.thumb")
    expect(thumbs).to_have_count(4)
    assert thumbs.first.get_attribute("loading") == "lazy"
    wait_for(lambda: loaded(page, "img.thumb") == 4, 30, "the browser to load the four thumbnails")
    reason = store.get_json(f"batches/{plan.batch_id}/failed/{bad.id}.json")["reason"]
    expect(page.locator(".failures td.reason")).to_have_text(reason)
    expect(page.locator(f'.tile.failed[data-job="{bad.id}"] .placeholder')).to_have_attribute("title", reason)

    page.fill('input[name="q"]', "RED FOX")  # prompt text, any case
    page.click("form.filter button")
    expect(thumbs).to_have_count(1)
    expect(page.locator(".tile .prompt")).to_have_text(good[2].prompt)
    page.fill('input[name="q"]', "")
    page.fill('input[name="seed"]', str(good[1].seed))
    page.click("form.filter button")
    expect(page.locator(f'.tile[data-job="{good[1].id}"]')).to_have_count(1)
    expect(page.locator(".tile")).to_have_count(sum(1 for j in plan.jobs if j.seed == good[1].seed))

    page.goto(f"/batches/{plan.batch_id}")
    page.locator(f'.tile[data-job="{good[0].id}"] a').click()
    expect(page).to_have_url(f"{api.url}/images/{good[0].id}")
    expect(page.locator("#prompt")).to_have_text(good[0].prompt)  # the HTML in it, as text
    meta = store.get_json(sidecar_key(good[0].id))
    expect(page.locator("#infotext")).to_have_text(meta["infotext"])
    expect(page.locator("#sidecar")).to_contain_text(f'"job_id": "{good[0].id}"')
    wait_for(lambda: loaded(page, "img.full") == 1, 30, "the full-size image to load")
    assert page.locator("img.full").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
    page.click("text=Copy parameters")
    expect(page.locator(".copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == meta["infotext"]
    assert dialogs == []  # no script of the prompt's ran

    page.click("header .logout button")
    expect(page).to_have_url(f"{api.url}/login")
    page.goto(f"/images/{good[0].id}")
    expect(page).to_have_url(re.compile(r"/login\?next="))

    for job in good:  # beside each PNG, the worker's thumbnail: a small WebP of it
        with Image.open(io.BytesIO(store.get(thumbnail_key(job.id)))) as thumb:
            assert (thumb.format, thumb.size) == ("WEBP", (64, 64))
    assert not store.exists(thumbnail_key(bad.id))


def test_cancel_in_the_browser_stops_a_running_batch(
        tmp_path: Path, gallery_worker: WorkerProcess, api: ApiServer, env: dict[str, str], board: ProgressBoard,
        registry: Registry, page: Page, dialogs: list[str]) -> None:
    from playwright.sync_api import expect

    tag = uuid.uuid4().hex[:6]
    # 24 chunks of 4, about 2 s each on one worker (0.4 s an image): the first is done long before the last
    plan = submitted(write_batch(tmp_path, f"long {tag}", [f"a long batch {tag} {n}" for n in range(96)], steps=40),
                     env, registry)
    log_in(page, api)
    page.goto(f"/batches/{plan.batch_id}")
    done = page.locator('section.progress [data-field="done"]')
    expect(done).not_to_have_text("0", timeout=120_000)  # live: the count moves on the open page
    expect(page.locator(".tile.done img.thumb").first).to_be_visible()  # and the grid fills in
    page.click("button.cancel")  # confirmed in the dialog
    assert [d.split("?")[0] for d in dialogs] == ["Cancel this batch"]
    state = page.locator('section.progress [data-field="state"]')
    expect(state).to_have_text("cancelled")
    expect(page.locator("button.resume")).to_be_visible()
    expect(page.locator("button.cancel, button.pause")).to_have_count(0)

    # the chunk in hand is dropped before its upload, those queued are skipped: then nothing moves any more
    wait_for(lambda: queue_depth(board.r, TINY) == 0 and board.in_flight(plan.batch_id) is False, 120,
             "the worker to drop the cancelled batch's chunks")
    p = board.read(plan.batch_id)
    assert p is not None
    assert p.state == "cancelled"
    assert p.done < p.total
    settled = p.done
    page.reload()
    expect(state).to_have_text("cancelled")
    expect(done).to_have_text(str(settled))
    bits = board.done_bits(plan.batch_id)
    expect(page.locator(".tile.done")).to_have_count(sum(is_set(bits, i) for i in range(PAGE_SIZE)))


def test_prompts_and_names_are_shown_as_text(
        tmp_path: Path, api: ApiServer, env: dict[str, str], registry: Registry) -> None:
    name = '<b onmouseover="alert(1)">bold</b> & co'
    plan = submitted(write_batch(tmp_path, name, [json.dumps(HOSTILE)], model=IDLE), env, registry)
    session = gallery_session(api)
    pages = [session.get(api.url + path, timeout=10) for path in
             ("/", f"/batches/{plan.batch_id}", f"/gallery/batches/{plan.batch_id}/tiles")]
    for r in pages:
        assert r.status_code == 200
        assert "<script>alert" not in r.text
        assert "<img src=x" not in r.text
        assert "<b onmouseover" not in r.text
    assert "&lt;b onmouseover=&#34;alert(1)&#34;&gt;bold&lt;/b&gt; &amp; co" in pages[0].text
    assert "&lt;script&gt;alert(&#34;prompt&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in pages[1].text
    progress = session.get(f"{api.url}/gallery/batches/{plan.batch_id}/progress", timeout=10).json()
    assert (progress["name"], progress["total"], progress["state"]) == (name, 1, "active")  # JSON, set as text


def test_the_control_buttons_post_forms_checked_against_another_sites_posts(
        tmp_path: Path, api: ApiServer, env: dict[str, str], registry: Registry, board: ProgressBoard) -> None:
    plan = submitted(write_batch(tmp_path, "controlled", ["a queued job no worker takes"], model=IDLE), env, registry)
    session = gallery_session(api)
    url = f"{api.url}/batches/{plan.batch_id}"

    def buttons() -> tuple[list[str], str]:
        text = session.get(url, timeout=10).text
        return re.findall(r'<button type="submit" name="action" value="(\w+)"', text), CSRF.findall(text)[0]

    shown, csrf = buttons()
    assert shown == ["pause", "cancel"]
    for data, origin in (({"csrf": csrf}, "http://evil.example"), ({}, api.url), ({"csrf": "0" * 64}, api.url)):
        r = session.post(url + "/pause", data=data, headers={"Origin": origin}, allow_redirects=False, timeout=10)
        assert r.status_code == 403
    assert requests.post(url + "/pause", data={"csrf": csrf}, headers={"Origin": api.url}, allow_redirects=False,
                         timeout=10).status_code == 303  # no session: to the login page
    assert board.state(plan.batch_id) == "active"  # none of them did anything

    for action, state, then in (("pause", "paused", ["resume", "cancel"]), ("resume", "active", ["pause", "cancel"]),
                                ("cancel", "cancelled", ["resume"])):
        r = session.post(f"{url}/{action}", data={"csrf": csrf}, headers={"Origin": api.url}, allow_redirects=False,
                         timeout=10)
        assert (r.status_code, r.headers["location"]) == (303, f"/batches/{plan.batch_id}")
        assert board.state(plan.batch_id) == state
        shown, csrf = buttons()
        assert shown == then
    unknown = session.post(f"{api.url}/batches/{'f' * 20}/pause", data={"csrf": csrf}, headers={"Origin": api.url},
                           timeout=10)
    assert unknown.status_code == 404


def test_thumbnails_are_proxied_and_made_for_an_image_stored_without_one(api: ApiServer, store: Store) -> None:
    job_id = uuid.uuid4().hex  # an image stored before workers wrote thumbnails
    buf = io.BytesIO()
    Image.new("RGB", (512, 384), "blue").save(buf, format="PNG")
    assert store.put_if_absent(image_key(job_id), buf.getvalue(), "image/png")
    session = gallery_session(api)
    r = session.get(f"{api.url}/thumbs/{job_id}", timeout=10)
    assert (r.status_code, r.headers["content-type"]) == (200, "image/webp")
    assert "immutable" in r.headers["cache-control"]
    with Image.open(io.BytesIO(r.content)) as thumb:
        assert thumb.size == (256, 192)
    assert store.get(thumbnail_key(job_id)) == r.content  # stored, put-if-absent: served from S3 from now on
    assert session.get(f"{api.url}/thumbs/{job_id}", timeout=10).content == r.content
    assert session.get(f"{api.url}/images/{job_id}/image.png", timeout=10).content == buf.getvalue()
    assert session.get(f"{api.url}/thumbs/{uuid.uuid4().hex}", timeout=10).status_code == 404
    assert requests.get(f"{api.url}/thumbs/{job_id}", timeout=10).status_code == 401  # no session
