"""Who may see the photos: the access token, the cookie it becomes, CSRF, and the headers.

The web app serves a person's private photos, so every request but the static files (the
app's own CSS and JavaScript) needs the token, as Jupyter does: pages take it once as
`?token=`, trade it for an HttpOnly cookie and redirect to the same URL without it (so it
leaves the address bar and the history); the API also takes `Authorization: Bearer TOKEN`.
A request authenticated by the cookie alone must also carry a CSRF token to change
anything (a form field or the `X-CSRF-Token` header), since a browser sends cookies by
itself; a bearer token is never sent by a browser unasked, so it needs none.

`Guard` is the one place that checks it: an ASGI middleware around the whole app, so that a
route added later cannot forget, and every response (a 401 and a 500 too) carries the
security headers.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from enum import StrEnum
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, urlencode

from starlette.datastructures import MutableHeaders
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from ..config import Config, ConfigError
from .errors import Forbidden

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "cliptagd_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
# 30 days: a phone keeps its access without the login URL each time; a new token (a restart
# without web.token_file) makes the cookie worthless at once anyway.
COOKIE_MAX_AGE = 30 * 24 * 3600

# No inline script or style anywhere (the JavaScript and CSS are files under /static), so
# an injected tag does nothing even if escaping ever failed; no framing; forms post only here.
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    # Keeps a ?token= URL out of the Referer of any link followed from the page.
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}

STATIC_PREFIX = "/static/"
# Paths that answer in JSON (or text for programs): a 401 there is JSON, not a page.
MACHINE_PATHS = ("/metrics", "/openapi.json")


class Auth(StrEnum):
    """How a request proved it holds the token."""

    COOKIE = "cookie"
    BEARER = "bearer"  # the Authorization header
    QUERY = "query"  # ?token= (the API, /metrics; pages trade it for the cookie)


def load_token(config: Config) -> tuple[str, bool]:
    """The access token, and whether it was made up now: from `web.token_file` (stripped),
    else a random one (the login URL is then logged). Raises ConfigError for a token file
    that is missing, unreadable or empty."""
    path = config.web.token_file
    if path is None:
        return secrets.token_urlsafe(32), True
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"web.token_file: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"web.token_file: {path}: cannot read it ({reason})") from None
    if not token:
        raise ConfigError(
            f"web.token_file: {path} is empty (put a long random token in it, such as the "
            "output of: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token, False


def login_url(host: str, port: int, token: str) -> str:
    """http://HOST:PORT/?token=TOKEN, an IPv6 address in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"http://{host}:{port}/?token={quote(token, safe='')}"


def derived(token: str, purpose: str) -> str:
    """A value only the token's holder can make, for one purpose: the cookie ("session")
    holds one instead of the token itself, and the CSRF token ("csrf") is another."""
    return hmac.new(token.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def same(given: str, expected: str) -> bool:
    """Constant-time comparison (compare_digest refuses non-ASCII str, so bytes)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def check_csrf(request: Request, given: str | None) -> None:
    """Raise Forbidden unless a request that changes something may: one authenticated by a
    bearer or query token, or one that carries the CSRF token beside its cookie."""
    if request.state.auth != Auth.COOKIE:
        return
    if given is None or not same(given, request.app.state.csrf):
        raise Forbidden(
            "Missing or wrong CSRF token: reload the page and try again (an API client "
            "sends Authorization: Bearer TOKEN instead)."
        )


def is_machine_path(path: str) -> bool:
    return path.startswith("/api/") or path in MACHINE_PATHS


_DENIED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cliptagd: log in</title><link rel="stylesheet" href="/static/app.css"></head>
<body><main class="message"><h1>Open the login URL</h1>
<p>This gallery needs its access token. Open the login URL that cliptagd logged when it
started (<code>http://HOST:PORT/?token=&hellip;</code>), or add <code>?token=</code> and the
token in <code>web.token_file</code> to this address.</p></main></body></html>
"""


class Guard:
    """ASGI middleware: the token on every request but the static files, and the security
    headers on every response."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token
        self.session = derived(token, "session")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # none is served
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        static = path.startswith(STATIC_PREFIX)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if not static and "cache-control" not in headers:
                    headers["cache-control"] = "no-store"  # private pages and answers
            await send(message)

        if static:
            await self.app(scope, receive, send_with_headers)
            return
        how, query = self._authenticate(scope)
        if how is None:
            await self._denied(path)(scope, receive, send_with_headers)
            return
        if how is Auth.QUERY and not is_machine_path(path) and scope["method"] in ("GET", "HEAD"):
            await self._trade_for_cookie(scope, query)(scope, receive, send_with_headers)
            return
        scope.setdefault("state", {})["auth"] = how
        await self.app(scope, receive, send_with_headers)

    def _authenticate(self, scope: Scope) -> tuple[Auth | None, list[tuple[str, str]]]:
        """How the request holds the token (None: it does not), and its query without it."""
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [value for name, value in query if name == "token"]
        rest = [(name, value) for name, value in query if name != "token"]
        if given:
            # A wrong ?token= is refused even beside a good cookie: a mistyped URL should say so.
            return (Auth.QUERY if same(given[-1], self.token) else None), rest
        headers = dict(scope.get("headers", ()))
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials:
            return (Auth.BEARER if same(credentials.strip(), self.token) else None), rest
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
        except Exception:  # a malformed Cookie header from elsewhere: as if none
            return None, rest
        session = cookie.get(COOKIE)
        if session is not None and same(session.value, self.session):
            return Auth.COOKIE, rest
        return None, rest

    def _trade_for_cookie(self, scope: Scope, rest: list[tuple[str, str]]) -> Response:
        """The same URL without ?token=, and the cookie that stands for it from now on."""
        raw = scope.get("raw_path") or scope["path"].encode()
        # One leading slash: "//host" would be another site (an open redirect).
        location = "/" + raw.decode("latin-1").lstrip("/\\")
        if rest:
            location += "?" + urlencode(rest)
        response = RedirectResponse(location, status_code=303)
        response.set_cookie(
            COOKIE, self.session, max_age=COOKIE_MAX_AGE, path="/", httponly=True,
            samesite="strict",
        )  # fmt: skip
        return response

    @staticmethod
    def _denied(path: str) -> Response:
        if is_machine_path(path):
            return JSONResponse(
                {"detail": "Needs the access token: Authorization: Bearer TOKEN, or ?token=."},
                status_code=401,
                headers={"www-authenticate": "Bearer"},
            )
        return HTMLResponse(_DENIED_PAGE, status_code=401)
