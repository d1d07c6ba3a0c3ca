"""Dashboard pages. Radiologist view (viewer role): the study list and each study. IT view (admin role):
peers, associations, queues and dead letters, system status. Plus the open /healthz and /metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from node.dicom.scu import echo
from node.peers import PeerDirectory, PeerError, peer_from_fields
from node.runtime.health import check_health
from node.runtime.metrics import render_metrics
from node.runtime.status import collect_status
from node.settings import PRIORITIES
from node.web.pages import PageRequest, WebContext, page, redirect
from node.web.thumbnails import result_images, thumbnail_png
from storage.notifications import Notifications
from storage.outbox import Outbox
from storage.queue import JobQueue

log = logging.getLogger("msknode.web")


# -- radiologist view ---------------------------------------------------------------------------
@page("viewer")
def studies(pr: PageRequest) -> Response:
    web = pr.web
    rows = web.data.studies(limit=200)
    thumbnails = {
        row.id for row in rows[:60]
        if row.job_state == "done" and result_images(web.spool.root, row.study_instance_uid)
    }
    return pr.render("studies.html", studies=rows, thumbnails=thumbnails)


@page("viewer")
def study(pr: PageRequest) -> Response:
    found = pr.web.data.study(int(pr.request.path_params["study_id"]))
    if found is None:
        raise HTTPException(404, "no such study")
    row, study_uid, images, deliveries = found
    captures = result_images(pr.web.spool.root, study_uid)
    capture_index = {c.source_sop_instance_uid: index for index, c in enumerate(captures)}
    unmatched = [index for index, c in enumerate(captures) if c.source_sop_instance_uid is None]
    return pr.render("study.html", study=row, images=images, deliveries=deliveries, capture_index=capture_index,
                     unmatched_captures=unmatched, selection=pr.web.data.series_selection(row.id),
                     capture_count=len(captures))


@page("viewer")
def thumbnail(pr: PageRequest) -> Response:
    params = pr.request.path_params
    study_uid = pr.web.data.study_uid(int(params["study_id"]))
    if study_uid is None:
        raise HTTPException(404, "no such study")
    captures = result_images(pr.web.spool.root, study_uid)
    index = int(params["index"])
    if not 0 <= index < len(captures):
        raise HTTPException(404, "no such image")
    data = thumbnail_png(captures[index], pr.web.thumbnail_cache, pr.web.settings.retention.days * 86400)
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


# -- IT view: peers -----------------------------------------------------------------------------
def _directory(web: WebContext) -> PeerDirectory:
    return PeerDirectory(web.settings, web.database)


def _peer_fields(form: dict[str, str], name: str | None = None) -> dict[str, Any]:
    """Form fields to PeerSettings fields; unchecked boxes are absent from a form, so they mean False."""
    fields: dict[str, Any] = {
        "name": name if name is not None else form.get("name", "").strip(),
        "ae_title": form.get("ae_title", ""),
        "host": form.get("host", "").strip(),
        "port": form.get("port", "").strip() or "104",
        "may_send": "may_send" in form,
        "receives_results": "receives_results" in form,
        "priority": form.get("priority", "routine"),
        "tls": "tls" in form,
        # DICOMweb: results by STOW-RS to url; the hash of the token the peer presents to our STOW-RS
        "protocol": form.get("protocol", "dimse"),
        "auth": form.get("auth", "none"),
        "verify_tls": "verify_tls" in form,
    }
    if form.get("settle_seconds", "").strip():
        fields["settle_seconds"] = form["settle_seconds"].strip()
    for key in ("url", "username", "secret_file", "ca_file", "stow_token_sha256"):
        if form.get(key, "").strip():
            fields[key] = form[key].strip()
    return fields


@page("admin")
def peers(pr: PageRequest) -> Response:
    return pr.render("peers.html", peers=_directory(pr.web).list(), priorities=PRIORITIES, form={}, error=None)


@page("admin")
def peer_add(pr: PageRequest) -> Response:
    directory = _directory(pr.web)
    try:
        peer = directory.add(peer_from_fields(_peer_fields(pr.form)), actor=f"web:{pr.user.username}")
    except PeerError as exc:
        return pr.render("peers.html", status_code=400, peers=directory.list(), priorities=PRIORITIES,
                         form=pr.form, error=str(exc))
    return redirect("/peers", f"Peer {peer.name} added.")


@page("admin")
def peer_edit(pr: PageRequest) -> Response:
    peer = _directory(pr.web).get(pr.request.path_params["name"])
    if peer is None:
        raise HTTPException(404, "no such peer")
    return pr.render("peer_edit.html", peer=peer, priorities=PRIORITIES, error=None)


@page("admin")
def peer_update(pr: PageRequest) -> Response:
    name = pr.request.path_params["name"]
    directory = _directory(pr.web)
    try:
        directory.update(name, peer_from_fields(_peer_fields(pr.form, name)), actor=f"web:{pr.user.username}")
    except PeerError as exc:
        peer = directory.get(name)
        if peer is None:
            raise HTTPException(404, "no such peer") from None
        return pr.render("peer_edit.html", status_code=400, peer=peer, priorities=PRIORITIES, error=str(exc))
    return redirect("/peers", f"Peer {name} saved.")


@page("admin")
def peer_remove(pr: PageRequest) -> Response:
    name = pr.request.path_params["name"]
    try:
        _directory(pr.web).remove(name, actor=f"web:{pr.user.username}")
    except PeerError as exc:
        return redirect("/peers", f"Cannot remove: {exc}")
    return redirect("/peers", f"Peer {name} removed.")


@page("admin")
def peer_echo(pr: PageRequest) -> Response:
    name = pr.request.path_params["name"]
    peer = _directory(pr.web).get(name)
    if peer is None:
        raise HTTPException(404, "no such peer")
    result = echo(pr.web.settings.node.ae_title, peer, timeout=10.0)
    where = f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port})"
    if result.ok:
        return redirect("/peers", f"C-ECHO {where}: success in {result.round_trip_ms:.1f} ms")
    return redirect("/peers", f"C-ECHO {where}: FAILED — {result.error}")


# -- IT view: associations, queues, system -----------------------------------------------------------
@page("admin")
def associations(pr: PageRequest) -> Response:
    return pr.render("associations.html", associations=pr.web.data.associations(limit=200))


@page("admin")
def queue(pr: PageRequest) -> Response:
    return pr.render("queue.html", **pr.web.data.queue())


@page("admin")
def queue_action(pr: PageRequest) -> Response:
    params = pr.request.path_params
    kind, number, action = params["kind"], int(params["number"]), params["action"]
    database = pr.web.database
    if kind == "job" and action == "retry":
        done = JobQueue(database).retry(number)
    elif kind in ("out", "note") and action in ("retry", "discard"):
        queue = Outbox(database) if kind == "out" else Notifications(database)
        done = queue.retry(number) if action == "retry" else queue.discard(number)
    else:
        raise HTTPException(404, "unknown queue action")
    what = {"job": "job", "out": "delivery", "note": "notification"}[kind]
    log.info("%s %s %d by %s: %s", action, what, number, pr.user.username, "done" if done else "not applicable")
    if not done:
        return redirect("/queue", f"{what.capitalize()} {number} is no longer in a state that allows {action}.")
    verb = "queued again" if action == "retry" else "discarded"
    return redirect("/queue", f"{what.capitalize()} {number} {verb}.")


def config_problems(web: WebContext, status: dict[str, Any]) -> list[str]:
    """What an admin should fix: roles not running, low disk, peers that do not resolve, a missing model."""
    problems = []
    for role in status["roles_configured"]:
        if role != "web" and not status["roles_alive"].get(role):
            problems.append(f"pipeline.roles: role {role} is configured but has not reported a heartbeat recently")
    if not status["disk"]["above_watermark"]:
        problems.append("storage.min_free_disk_mb: free disk on the spool is below the watermark; intake refuses")
    for index, entry in enumerate(web.settings.model_entries):
        if not Path(entry.path).exists():
            key = f"models[{index}].path" if web.settings.models else "engine.model"
            problems.append(f"{key}: {entry.path} does not exist")
    for peer in _directory(web).list():
        if not peer.addresses:
            problems.append(f"peers.{peer.name}.host: {peer.host!r} does not resolve")
    return problems


@page("admin")
def system(pr: PageRequest) -> Response:
    status = collect_status(pr.web.settings, pr.web.database)
    return pr.render("system.html", status=status, problems=config_problems(pr.web, status),
                     users=pr.web.accounts.users())


# -- /healthz and /metrics (no login: for load balancers and Prometheus) --------------------------
async def healthz(request: Request) -> Response:
    web: WebContext = request.app.state.web
    ok, detail = await run_in_threadpool(check_health, web.settings, web.database)
    return JSONResponse({"ok": ok, **(detail if isinstance(detail, dict) else {"detail": detail})},
                        status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    web: WebContext = request.app.state.web
    body, content_type = await run_in_threadpool(render_metrics, web.settings, web.database)
    return Response(body, headers={"Content-Type": content_type})
