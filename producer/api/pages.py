"""The gallery's plumbing: templates (Jinja2, autoescaped), the headers every page carries, who is
logged in (the session cookie), and the checks on forms posted to it.

Sessions: the login form takes an API token and sets SESSION_COOKIE (signed by auth.Auth: the token's
name and an expiry, never the token), HttpOnly, SameSite=Strict, Path=/, Secure when the request came
over https (or through a proxy that ended TLS: X-Forwarded-Proto). Forms that change something (log
out, cancel, pause, resume) are checked twice: the request's Origin (or, lacking one, its Referer)
must be this host, and the form must carry the session's CSRF token (an HMAC of the session cookie:
it changes with each login, and a page of another site can neither read it nor send the cookie,
SameSite=Strict).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from .auth import SESSION_COOKIE, SESSION_TTL_S, Auth

HERE = Path(__file__).resolve().parent
TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                        trim_blocks=True, lstrip_blocks=True)
# no inline script or style runs, even if some text escaped its escaping; no framing; forms post here only
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
                               " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
NO_STORE = {"Cache-Control": "no-store"}
# an object under a job id is written once and never changes (put-if-absent)
IMMUTABLE = {"Cache-Control": "private, max-age=86400, immutable"}


def auth_of(request: Request) -> Auth:
    auth: Auth = request.app.state.auth
    return auth


def session_name(request: Request) -> str | None:
    """The logged-in token name, from a valid session cookie; None otherwise."""
    return auth_of(request).session_name(request.cookies.get(SESSION_COOKIE))


def csrf_token(request: Request) -> str:
    """The CSRF token of the request's session (empty without a session)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return ""
    return hmac.new(auth_of(request).session_key, b"csrf|" + cookie.encode(), hashlib.sha256).hexdigest()


def local_path(target: str | None) -> str:
    """Where to go after logging in: a path on this site, or "/" (never another site: //host, /\\host,
    scheme:...)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target or len(target) > 2000:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or any(ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        return "/"
    return target


def login_url(request: Request) -> str:
    """The login page, coming back here after (after a form posted, to the page that posted it)."""
    if request.method != "GET":
        here = request.url.path.rsplit("/", 1)[0] or "/"
    else:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return "/login?next=" + quote(here, safe="")


class LoginFirst(HTTPException):
    """A page asked for without a valid session: the browser is sent to the login page."""

    def __init__(self, request: Request) -> None:
        super().__init__(303, "log in first", headers={"Location": login_url(request), **NO_STORE})


def _viewer(request: Request, redirect: bool) -> Iterator[str]:
    name = session_name(request)
    if name is None:
        if redirect:
            raise LoginFirst(request)
        raise HTTPException(401, "log in at /login first", headers=NO_STORE)
    with auth_of(request).slot(name):  # the token's concurrent-request cap holds in the gallery too
        yield name


def page_viewer(request: Request) -> Iterator[str]:
    """A page's viewer: without a session, a redirect to the login page."""
    yield from _viewer(request, redirect=True)


def data_viewer(request: Request) -> Iterator[str]:
    """A page's data (JSON, fragments, images): without a session, 401."""
    yield from _viewer(request, redirect=False)


def object_viewer(request: Request) -> str:
    """An image or a thumbnail of a page: without a session, 401. Not counted against the token's
    requests in flight: a batch page asks for dozens at once (HTTP/2 sends them all together)."""
    name = session_name(request)
    if name is None:
        raise HTTPException(401, "log in at /login first", headers=NO_STORE)
    return name


Page = Depends(page_viewer)
Data = Depends(data_viewer)
Object = Depends(object_viewer)


def same_origin(request: Request) -> None:
    """Refuse (403) a form posted from another site: its Origin, or its Referer, must be this host."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    host = request.headers.get("host")
    if not origin or origin == "null" or not host or urlsplit(origin).netloc.lower() != host.lower():
        raise HTTPException(403, "refused: the form was not posted from this site")


def check_form(request: Request, token: str) -> None:
    """A state-changing form: posted from this site, with this session's CSRF token."""
    same_origin(request)
    wanted = csrf_token(request)
    if not wanted or not hmac.compare_digest(token.encode(), wanted.encode()):
        raise HTTPException(403, "refused: the form's session token is missing or stale; reload the page")


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page: the template with the viewer's name and CSRF token, escaped, with SECURITY_HEADERS."""
    html = TEMPLATES.get_template(template).render(
        request=request, viewer=session_name(request), csrf=csrf_token(request), **context)
    return HTMLResponse(html, status_code=status_code, headers={**SECURITY_HEADERS, **NO_STORE})


def fragment(template: str, **context: Any) -> HTMLResponse:
    """A piece of a page, for the page's script to put in place (escaped like a page)."""
    return HTMLResponse(TEMPLATES.get_template(template).render(**context),
                        headers={**SECURITY_HEADERS, **NO_STORE})


def over_https(request: Request) -> bool:
    """The browser reached us over https: directly, or through a proxy that ended TLS and says so
    (X-Forwarded-Proto). Trusting that header is safe here, as it only ever adds Secure: a client
    that claims https over http gets a cookie its browser will not send back over http."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def set_session(response: RedirectResponse, request: Request, name: str) -> None:
    response.set_cookie(SESSION_COOKIE, auth_of(request).session(name), max_age=SESSION_TTL_S, path="/",
                        httponly=True, samesite="strict", secure=over_https(request))


def clear_session(response: RedirectResponse, request: Request) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=over_https(request))
