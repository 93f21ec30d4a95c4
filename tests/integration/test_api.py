"""`sdfarm serve`'s own promises, before any router: health, readiness, who may call, and errors."""

from __future__ import annotations

import requests

from tests.conftest import OTHER_TOKEN, ApiServer


def test_healthz_needs_no_token_and_readyz_sees_redis_and_s3(api: ApiServer) -> None:
    assert requests.get(api.url + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(api.url + "/readyz", headers=api.headers(), timeout=10)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "redis": "ok", "s3": "ok"}
    probe = requests.get(api.url + "/readyz", timeout=10)  # a probe has no token: the status alone
    assert (probe.status_code, probe.json()) == (200, {"status": "ok"})


def test_every_other_route_refuses_a_missing_or_wrong_token(api: ApiServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"}, {"Authorization": f"Basic {api.token}"},
                    {"Authorization": api.token}):
        r = requests.get(api.url + "/openapi.json", headers=headers, timeout=5)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json() == {"detail": "a valid token is required: Authorization: Bearer TOKEN"}
    assert requests.get(api.url + "/openapi.json", headers=api.headers(OTHER_TOKEN), timeout=5).status_code == 200


def test_no_token_appears_in_the_servers_log(api: ApiServer) -> None:
    requests.get(api.url + "/readyz", headers=api.headers(), timeout=5)
    requests.get(api.url + "/readyz", headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"}, timeout=5)
    assert api.token not in api.tail(10**6)
    assert "wrong-token" not in api.tail(10**6)


def test_the_openapi_document_describes_the_api(api: ApiServer) -> None:
    assert requests.get(api.url + "/openapi.json", timeout=5).status_code == 401
    assert requests.get(api.url + "/docs", timeout=5).status_code == 401
    assert "swagger" in requests.get(api.url + "/docs", headers=api.headers(), timeout=5).text.lower()
    doc = requests.get(api.url + "/openapi.json", headers=api.headers(), timeout=5).json()
    assert doc["info"]["title"] == "sdfarm"
    assert "/healthz" in doc["paths"]


def test_the_gallerys_session_reads_the_api_but_never_changes_anything_through_it(api: ApiServer) -> None:
    """A cookie rides along with any request a browser sends, one that a page on another port of the
    same host makes it send included (SameSite does not tell ports apart): through the API it only
    reads. The gallery's own forms check their origin and a form token."""
    s = requests.Session()
    login = s.post(api.url + "/login", data={"token": api.token, "next": "/"}, headers={"Origin": api.url},
                   allow_redirects=False, timeout=5)
    assert login.status_code == 303
    assert s.get(api.url + "/openapi.json", timeout=5).status_code == 200  # reading: the session will do
    evil = {"Origin": "http://127.0.0.1:1"}
    for path in ("/v1/batches", "/v1/batches/" + "0" * 20 + "/cancel", "/sdapi/v1/interrupt"):
        r = s.post(api.url + path, headers=evil, json={}, timeout=5)
        assert r.status_code == 401, (path, r.status_code, r.text)
