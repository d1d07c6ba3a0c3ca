"""The Starlette application of the ``web`` role: login, the radiologist and IT pages, /healthz, /metrics.

Every page goes through :func:`page`, which looks up the session, enforces the role and, for a POST, checks
the form's CSRF token against the session's (403 otherwise) before the handler runs in a worker thread
(the handlers do blocking database and file work).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import math
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from node.settings import Settings
from node.web.accounts import Accounts, SessionInfo, UserInfo
from node.web.data import DashboardData
from node.web.login_throttle import LoginThrottle
from storage.db import Database
from storage.spool import Spool

log = logging.getLogger("msknode.web")

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "msknode_session"
LOGIN_COOKIE = "msknode_login"
FLASH_COOKIE = "msknode_flash"


def load_secret(path: Path) -> bytes:
    """The key that signs the login form's CSRF token; created (mode 0600) on first start."""
    path = Path(path)
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_hex(32).encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key + b"\n")
    return key


@dataclass
class WebContext:
    """What the role's handlers share: settings, database, spool, accounts and the templates."""

    settings: Settings
    database: Database
    spool: Spool
    accounts: Accounts
    templates: Jinja2Templates
    secret: bytes
    data: DashboardData
    login_throttle: LoginThrottle

    @property
    def thumbnail_cache(self) -> Path:
        return self.spool.root / ".cache" / "thumbnails"


@dataclass
class PageRequest:
    """One authenticated request as a handler sees it."""

    request: Request
    web: WebContext
    session: SessionInfo
    form: dict[str, str] = field(default_factory=dict)
    flash: str | None = None

    @property
    def user(self) -> UserInfo:
        return self.session.user

    def render(self, template: str, status_code: int = 200, **context: Any) -> Response:
        context.update(user=self.user, csrf_token=self.session.csrf_token, flash=self.flash,
                       path=self.request.url.path)
        response = self.web.templates.TemplateResponse(self.request, template, context, status_code=status_code)
        if self.flash is not None:
            response.delete_cookie(FLASH_COOKIE)
        return response


def redirect(url: str, flash: str | None = None) -> RedirectResponse:
    """Post/redirect/get; an optional one-shot message rides in a short-lived cookie, never in the URL."""
    response = RedirectResponse(url, status_code=303)
    if flash:
        response.set_cookie(FLASH_COOKIE, quote(flash[:500]), max_age=60, httponly=True, samesite="lax")
    return response


def _web(request: Request) -> WebContext:
    return request.app.state.web


def page(role: str = "viewer") -> Callable[[Callable[[PageRequest], Response]], Callable[[Request], Awaitable[Response]]]:
    """Wrap a blocking handler: session required (else to /login), ``role`` enforced, CSRF checked on POST."""

    def decorate(handler: Callable[[PageRequest], Response]) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            web = _web(request)
            session = await run_in_threadpool(web.accounts.session_for, request.cookies.get(SESSION_COOKIE))
            if session is None:
                if request.method == "POST":
                    raise HTTPException(403, "not logged in")
                return RedirectResponse("/login", status_code=303)
            if role == "admin" and not session.user.is_admin:
                raise HTTPException(403, "this page needs the admin role")
            form: dict[str, str] = {}
            if request.method == "POST":
                raw = await request.form()
                form = {key: str(value) for key, value in raw.items()}
                if not hmac.compare_digest(form.get("csrf_token", ""), session.csrf_token):
                    log.warning("POST %s by %s without a valid CSRF token: refused", request.url.path, session.user.username)
                    raise HTTPException(403, "missing or invalid CSRF token")
            flash = request.cookies.get(FLASH_COOKIE)
            context = PageRequest(request, web, session, form, unquote(flash) if flash else None)
            return await run_in_threadpool(handler, context)

        return endpoint

    return decorate


# -- login ------------------------------------------------------------------------------------
def _login_token(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, f"login:{nonce}".encode(), hashlib.sha256).hexdigest()


async def login_form(request: Request, error: str | None = None, status_code: int = 200) -> Response:
    """The login page; its form carries a token bound (HMAC) to a nonce cookie, so a forged login fails."""
    web = _web(request)
    nonce = secrets.token_urlsafe(16)
    no_users = await run_in_threadpool(web.accounts.user_count) == 0
    response = web.templates.TemplateResponse(
        request, "login.html",
        {"login_token": _login_token(web.secret, nonce), "error": error, "no_users": no_users, "user": None},
        status_code=status_code,
    )
    response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="lax", secure=web.settings.web.cookie_secure)
    return response


async def login(request: Request) -> Response:
    web = _web(request)
    form = await request.form()
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not hmac.compare_digest(str(form.get("login_token", "")), _login_token(web.secret, nonce)):
        raise HTTPException(403, "missing or invalid CSRF token")
    username = str(form.get("username", "")).strip()
    address = request.client.host if request.client else "unknown"
    wait = web.login_throttle.retry_after(username, address)
    if wait:
        log.warning("dashboard login refused: too many failed logins (retry in %d s)", wait)
        minutes = math.ceil(wait / 60)
        response = await login_form(
            request, f"Too many failed logins. Try again in {minutes} minute{'s' if minutes != 1 else ''}.",
            status_code=429)
        response.headers["Retry-After"] = str(wait)
        return response
    user = await run_in_threadpool(web.accounts.authenticate, username, str(form.get("password", "")))
    if user is None:
        web.login_throttle.failed(username, address)
        log.warning("failed dashboard login")
        return await login_form(request, "Wrong user name or password.", status_code=401)
    web.login_throttle.succeeded(username)
    token, _csrf = await run_in_threadpool(web.accounts.start_session, user, web.settings.web.session_hours)
    log.info("dashboard login: %s (%s)", user.username, user.role)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE, token, max_age=int(web.settings.web.session_hours * 3600), httponly=True, samesite="lax",
        secure=web.settings.web.cookie_secure, path="/",
    )
    response.delete_cookie(LOGIN_COOKIE)
    return response


@page("viewer")
def logout(page_request: PageRequest) -> Response:
    page_request.web.accounts.end_session(page_request.request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    web = _web(request)
    return web.templates.TemplateResponse(
        request, "error.html", {"status": exc.status_code, "detail": exc.detail, "user": None},
        status_code=exc.status_code,
    )


def create_app(settings: Settings, database: Database, spool: Spool) -> "SecurityHeaders":
    """The dashboard app; the caller owns ``database`` and ``spool``."""
    from node.web import views

    templates = Jinja2Templates(directory=str(HERE / "templates"))
    web = WebContext(settings, database, spool, Accounts(database), templates, load_secret(settings.web.secret_key_file),
                     DashboardData(database, settings.engine.model),
                     LoginThrottle(settings.web.login_max_failures, settings.web.login_window_minutes))
    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/healthz", views.healthz, methods=["GET"]),
        Route("/metrics", views.metrics, methods=["GET"]),
        Route("/", views.studies, methods=["GET"]),
        Route("/studies/{study_id:int}", views.study, methods=["GET"]),
        Route("/studies/{study_id:int}/images/{index:int}.png", views.thumbnail, methods=["GET"]),
        Route("/peers", views.peers, methods=["GET"]),
        Route("/peers", views.peer_add, methods=["POST"]),
        Route("/peers/{name}/edit", views.peer_edit, methods=["GET"]),
        Route("/peers/{name}", views.peer_update, methods=["POST"]),
        Route("/peers/{name}/remove", views.peer_remove, methods=["POST"]),
        Route("/peers/{name}/echo", views.peer_echo, methods=["POST"]),
        Route("/associations", views.associations, methods=["GET"]),
        Route("/queue", views.queue, methods=["GET"]),
        Route("/queue/{kind:str}/{number:int}/{action:str}", views.queue_action, methods=["POST"]),
        Route("/system", views.system, methods=["GET"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.web = web
    return SecurityHeaders(app)


class SecurityHeaders:
    """Headers on every response: no framing (clickjacking), no MIME sniffing, no referrer, and pages with
    patient data never stored by the browser or a proxy cache."""

    HEADERS = [
        (b"x-frame-options", b"DENY"),
        (b"content-security-policy", b"default-src 'self'; img-src 'self'; frame-ancestors 'none'; form-action 'self'"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.HEADERS if name not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
