"""The gallery's doors, with no Redis or S3 behind the app (both unreachable: any request that reached
them would answer 503): the login form and its cookie, redirects, the checks on posted forms, and ids
in paths refused before anything is asked of S3 or Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from producer.api.app import create_app
from producer.api.auth import SESSION_COOKIE, SESSION_TTL_S
from producer.api.pages import local_path
from producer.farm import Farm
from sdfarm.settings import Settings

TOKEN = "gallery-token-" + "g" * 20
NOWHERE = "127.0.0.1:9"  # nothing listens: Redis and S3 "unreachable"
ORIGIN = {"Origin": "http://testserver"}
JOB = "0123456789abcdef0123456789abcdef"
BATCH = "0123456789abcdef0123"


def client(base_url: str = "http://testserver") -> TestClient:
    settings = Settings(api_tokens=SecretStr(f"tests:{TOKEN}"), redis_url=SecretStr(f"redis://{NOWHERE}/0"),
                        s3_endpoint_url=f"http://{NOWHERE}", s3_access_key_id="nobody",
                        s3_secret_access_key=SecretStr("nothing"), s3_max_attempts=1)
    return TestClient(create_app(Farm.from_settings(settings)), base_url=base_url, follow_redirects=False,
                      raise_server_exceptions=False)


@pytest.fixture
def logged_in() -> Iterator[TestClient]:
    with client() as c:
        assert c.post("/login", data={"token": TOKEN}, headers=ORIGIN).status_code == 303
        yield c


def test_pages_send_the_browser_to_the_login_form_and_their_data_answers_401() -> None:
    with client() as c:
        assert c.get("/").headers["location"] == "/login?next=%2F"
        r = c.get(f"/batches/{BATCH}?q=fox&page=2")
        assert (r.status_code, r.headers["location"]) == (303, f"/login?next=%2Fbatches%2F{BATCH}%3Fq%3Dfox%26page%3D2")
        assert c.get(f"/images/{JOB}").status_code == 303
        # a form posted once the session is over comes back to the page that posted it
        assert c.post(f"/batches/{BATCH}/cancel").headers["location"] == f"/login?next=%2Fbatches%2F{BATCH}"
        for path in ("/gallery/batches.json", f"/thumbs/{JOB}", f"/images/{JOB}/image.png",
                     f"/gallery/batches/{BATCH}/progress", f"/gallery/batches/{BATCH}/tiles"):
            assert c.get(path).status_code == 401, path
        assert c.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 303  # pages: sessions only
        login = c.get("/login?next=/batches/x")
        assert login.status_code == 200
        assert 'name="next" value="/batches/x"' in login.text


def test_a_wrong_token_is_refused_and_sets_no_cookie() -> None:
    with client() as c:
        for token in ("wrong-token-" + "w" * 20, "", TOKEN[:-1], TOKEN + " "):
            r = c.post("/login", data={"token": token}, headers=ORIGIN)
            assert r.status_code == 401
            assert "That token is not valid." in r.text
            assert "set-cookie" not in r.headers
            assert TOKEN not in r.text


def test_login_sets_an_httponly_strict_cookie_that_names_no_token() -> None:
    with client() as c:
        r = c.post("/login", data={"token": TOKEN, "next": f"/batches/{BATCH}"}, headers=ORIGIN)
        assert (r.status_code, r.headers["location"]) == (303, f"/batches/{BATCH}")
        cookie = r.headers["set-cookie"]
        flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
        assert cookie.startswith(f"{SESSION_COOKIE}=tests|")
        assert TOKEN not in cookie
        assert {"httponly", "path", "samesite", "max-age"} <= set(flags)
        assert (flags["path"], flags["samesite"].lower(), flags["max-age"]) == ("Path=/", "samesite=strict",
                                                                               f"Max-Age={SESSION_TTL_S}")
        assert "secure" not in flags  # plain http (loopback, a dev machine): a Secure cookie would not come back
        assert c.get("/login").headers["location"] == "/"  # logged in: the form sends the browser on
    with client("https://testserver") as c:
        r = c.post("/login", data={"token": TOKEN}, headers={"Origin": "https://testserver"})
        assert "; secure" in r.headers["set-cookie"].lower()
    with client() as c:  # TLS ended by a proxy in front
        r = c.post("/login", data={"token": TOKEN}, headers={**ORIGIN, "X-Forwarded-Proto": "https"})
        assert "; secure" in r.headers["set-cookie"].lower()


def test_login_is_posted_from_this_site_only_and_goes_on_to_this_site_only() -> None:
    with client() as c:
        for headers in ({}, {"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Referer": "http://evil.example/testserver"}, {"Origin": "http://testserver.evil.example"}):
            r = c.post("/login", data={"token": TOKEN}, headers=headers)
            assert r.status_code == 403, headers
            assert "set-cookie" not in r.headers
        # no Origin (an old browser) but a Referer of this site
        assert c.post("/login", data={"token": TOKEN}, headers={"Referer": "http://testserver/login"}
                      ).status_code == 303
        for target in ("//evil.example/x", "https://evil.example", "/\\evil.example", "javascript:alert(1)",
                       "/x\r\nSet-Cookie: a=b"):
            r = c.post("/login", data={"token": TOKEN, "next": target}, headers=ORIGIN)
            assert r.headers["location"] == "/", target


@pytest.mark.parametrize(("target", "kept"), [("/", "/"), (f"/batches/{BATCH}?q=a+b&seed=3", None),
                                              ("//x", "/"), ("/\\x", "/"), ("http://x/", "/"), ("", "/"),
                                              ("x", "/"), ("/a\x00", "/"), ("/" + "a" * 3000, "/")])
def test_where_a_login_goes_next_is_a_path_here(target: str, kept: str | None) -> None:
    assert local_path(target) == (target if kept is None else kept)


def test_forms_that_change_something_need_this_sites_origin_and_the_sessions_token(logged_in: TestClient) -> None:
    for data, headers in (({}, ORIGIN), ({"csrf": "0" * 64}, ORIGIN), ({"csrf": ""}, ORIGIN)):
        assert logged_in.post("/logout", data=data, headers=headers).status_code == 403
        assert logged_in.post(f"/batches/{BATCH}/cancel", data=data, headers=headers).status_code == 403
    assert logged_in.post(f"/batches/{BATCH}/cancel", data={}, headers={"Origin": "http://evil.example"}
                          ).status_code == 403
    assert logged_in.post(f"/batches/{BATCH}/delete", data={}, headers=ORIGIN).status_code == 404  # no such action


def test_ids_in_paths_are_refused_before_s3_or_redis_is_asked(logged_in: TestClient) -> None:
    for path in (f"/batches/{BATCH.upper()}", "/batches/0123", "/batches/" + "a" * 65, "/batches/..%2F..%2Fetc",
                 "/batches/%2e%2e", f"/batches/{BATCH}%00", f"/batches/{BATCH}%20", "/images/" + "g" * 32,
                 "/images/" + "0" * 31, "/images/" + "0" * 33, f"/images/{JOB}/..%2F..%2Fx", "/thumbs/%2e%2e",
                 f"/thumbs/{JOB.upper()}", f"/thumbs/{JOB}.webp", f"/images/{JOB[:-1]}/image.png",
                 f"/images/{JOB}x/sidecar.json", f"/gallery/batches/{BATCH}g/progress",
                 f"/gallery/batches/{BATCH[:15]}/tiles", "/gallery/static/..%2Fapp.py", "/gallery/static/app.py"):
        r = logged_in.get(path)
        assert r.status_code == 404, path
    assert logged_in.post(f"/batches/{BATCH[:-1]}Z/pause", data={}, headers=ORIGIN).status_code == 404
    # a well-formed id is looked up: here, nothing answers (503), which the refusals above never reached
    assert logged_in.get(f"/thumbs/{JOB}").status_code == 503
    assert logged_in.get(f"/gallery/batches/{BATCH}/progress").status_code == 503


def test_pages_carry_a_content_security_policy_and_are_not_cached() -> None:
    with client() as c:
        r = c.get("/login")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert (r.headers["x-frame-options"], r.headers["x-content-type-options"]) == ("DENY", "nosniff")
        assert r.headers["cache-control"] == "no-store"
        js = c.get("/gallery/static/gallery.js")
        assert (js.status_code, js.headers["content-type"].split(";")[0]) == (200, "text/javascript")
