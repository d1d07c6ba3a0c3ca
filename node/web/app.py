"""The Starlette application of the ``web`` role: routes for login, the radiologist and IT pages, /healthz and
/metrics, error pages and the security headers every response carries.

Handlers live in :mod:`node.web.views` and :mod:`node.web.login`; the plumbing they share (session, role,
CSRF) in :mod:`node.web.pages`. This module only assembles them, so nothing imports it but the role.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from node.settings import Settings
from node.web import views
from node.web.accounts import Accounts
from node.web.data import DashboardData
from node.web.login import load_secret, login, login_form, logout
from node.web.login_throttle import LoginThrottle
from node.web.pages import WebContext, web_context
from storage.db import Database
from storage.spool import Spool

HERE = Path(__file__).resolve().parent


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    web = web_context(request)
    return web.templates.TemplateResponse(
        request, "error.html", {"status": exc.status_code, "detail": exc.detail, "user": None},
        status_code=exc.status_code,
    )


def create_app(settings: Settings, database: Database, spool: Spool) -> "SecurityHeaders":
    """The dashboard app; the caller owns ``database`` and ``spool``."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    web = WebContext(settings, database, spool, Accounts(database), templates, load_secret(settings.web.secret_key_file),
                     DashboardData(database, [(e.name, e.path) for e in settings.model_entries]),
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
