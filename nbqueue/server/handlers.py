"""REST handlers under ``{base_url}/nbqueue/api/`` and the dashboard page at ``{base_url}/nbqueue``.

Routes (JSON unless said otherwise)::

    GET    /nbqueue                                   the dashboard (HTML)
    GET    /nbqueue/api/queues                        queues with their counts
    POST   /nbqueue/api/queues            {"url"}     show another queue; returns its id
    GET    /nbqueue/api/queues/<qid>/jobs             the queue's jobs with counts
    GET    /nbqueue/api/queues/<qid>/jobs/<job>       one job: counts, timing, recent errors, source
    POST   /nbqueue/api/queues/<qid>/jobs/<job>/cancel  {"task_ids"?}  cancel it (or those tasks)
    GET    /nbqueue/api/queues/<qid>/dead             dead letters (no payloads)
    POST   /nbqueue/api/queues/<qid>/dead/redrive     queue them again
    GET    /nbqueue/api/workers                       worker processes the server started
    POST   /nbqueue/api/workers       {"queue"|"url", "n", "origin"?}   start n workers on a queue
    DELETE /nbqueue/api/workers[/<pid>]               stop all of them, or one
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from importlib import resources
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from tornado import web

from ..errors import NbQueueError
from ..report import dead_letters
from .registry import QueueRegistry

AUTH_RESOURCE = "nbqueue"
#: Errors a job page lists, newest first.
RECENT_ERRORS = 20


class _Base(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def registry(self) -> QueueRegistry:
        return self.settings["nbqueue_registry"]

    def queue(self, qid: str):
        try:
            return self.registry.get(qid)
        except KeyError:
            raise web.HTTPError(404, f"no queue {qid!r} on this server") from None

    def body(self) -> dict[str, Any]:
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError as exc:
            raise web.HTTPError(400, f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "request body must be a JSON object")
        return data

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))


def queue_summary(qid: str, tq) -> dict[str, Any]:
    """A queue as the API shows it (the URL comes from the backend: password redacted)."""
    try:
        return {"id": qid, "url": tq.url, "counts": tq.status().as_dict(), "error": None}
    except NbQueueError as exc:
        return {"id": qid, "url": tq.url, "counts": None, "error": str(exc)}


def job_summary(job) -> dict[str, Any]:
    meta = job.meta
    return {
        "id": job.id, "name": job.name, "state": meta.get("state"), "total": job.total,
        "created": meta.get("created"), "counts": job.counts().as_dict(),
    }  # fmt: skip


class QueuesHandler(_Base):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.reply([queue_summary(qid, tq) for qid, tq in self.registry.items()])

    @web.authenticated
    @authorized
    def post(self) -> None:
        url = self.body().get("url")
        if not isinstance(url, str) or not url:
            raise web.HTTPError(400, 'give the queue as {"url": "fq://..."}')
        try:
            qid = self.registry.add(url)
        except NbQueueError as exc:
            raise web.HTTPError(400, str(exc)) from None
        self.reply(queue_summary(qid, self.registry.get(qid)), status=201)


class JobsHandler(_Base):
    @web.authenticated
    @authorized
    def get(self, qid: str) -> None:
        self.reply([job_summary(job) for job in self.queue(qid).jobs()])


class JobHandler(_Base):
    @web.authenticated
    @authorized
    def get(self, qid: str, job_id: str) -> None:
        tq = self.queue(qid)
        try:
            job = tq.job(job_id)
        except (KeyError, ValueError):
            raise web.HTTPError(404, f"no job {job_id!r} in this queue") from None
        data = job_summary(job)
        data["source"] = job.meta.get("source")
        data["errors"] = dead_letters(tq, job.id, RECENT_ERRORS)
        data["running"] = [asdict(p) for p in job.running_progress()]
        self.reply(data)


class CancelHandler(_Base):
    @web.authenticated
    @authorized
    async def post(self, qid: str, job_id: str) -> None:
        ids = self.body().get("task_ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(t, str) for t in ids)):
            raise web.HTTPError(400, "task_ids must be a list of task ids")
        tq = self.queue(qid)
        try:
            # Storage I/O off the server's event loop: a slow storage must not stall every request.
            ended = await asyncio.to_thread(tq.cancel, job_id, ids)
        except KeyError:
            raise web.HTTPError(404, f"no job {job_id!r} in this queue") from None
        except ValueError as exc:
            raise web.HTTPError(400, str(exc)) from None
        self.reply({"job_id": job_id, "ended": ended})


class DeadHandler(_Base):
    @web.authenticated
    @authorized
    def get(self, qid: str) -> None:
        self.reply(dead_letters(self.queue(qid)))


class RedriveHandler(_Base):
    @web.authenticated
    @authorized
    def post(self, qid: str) -> None:
        ids = self.body().get("task_ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(t, str) for t in ids)):
            raise web.HTTPError(400, "task_ids must be a list of task ids")
        self.reply({"redriven": self.queue(qid).redrive(ids)})


class WorkersHandler(_Base):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.registry.workers())

    @web.authenticated
    @authorized
    def post(self) -> None:
        data = self.body()
        n = data.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise web.HTTPError(400, "n must be a positive whole number of workers")
        qid = data.get("queue")
        if qid is None and isinstance(data.get("url"), str):
            try:
                qid = self.registry.add(data["url"])
            except NbQueueError as exc:
                raise web.HTTPError(400, str(exc)) from None
        if not isinstance(qid, str):
            raise web.HTTPError(400, 'give the queue as {"queue": ID} or {"url": URL}')
        origin = data.get("origin", "api")
        if origin not in ("api", "kernel"):
            raise web.HTTPError(400, 'origin is "api" or "kernel"')
        self.queue(qid)
        try:
            group = self.registry.start_workers(qid, n, origin)
        except ValueError as exc:
            raise web.HTTPError(409, str(exc)) from None
        self.reply({"queue": qid, "pids": group.pool.pids}, status=201)

    @web.authenticated
    @authorized
    async def delete(self, pid: str | None = None) -> None:
        # Workers finish their running task before they stop: wait in a thread, not the event loop.
        stopped = await asyncio.to_thread(self.registry.stop_workers, int(pid) if pid else None)
        self.reply({"stopped": stopped})


class DashboardHandler(JupyterHandler):
    auth_resource = AUTH_RESOURCE

    @web.authenticated
    @authorized
    def get(self) -> None:
        page = resources.files("nbqueue.server").joinpath("static").joinpath("dashboard.html").read_text()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(page.replace("{{base_url}}", self.base_url))


_Q = r"(?P<qid>[0-9a-f]{12})"
HANDLERS = [
    (r"/nbqueue/?", DashboardHandler),
    (r"/nbqueue/api/queues/?", QueuesHandler),
    (rf"/nbqueue/api/queues/{_Q}/jobs/?", JobsHandler),
    (rf"/nbqueue/api/queues/{_Q}/jobs/(?P<job_id>[A-Za-z0-9_]+)/?", JobHandler),
    (rf"/nbqueue/api/queues/{_Q}/jobs/(?P<job_id>[A-Za-z0-9_]+)/cancel/?", CancelHandler),
    (rf"/nbqueue/api/queues/{_Q}/dead/?", DeadHandler),
    (rf"/nbqueue/api/queues/{_Q}/dead/redrive/?", RedriveHandler),
    (r"/nbqueue/api/workers/?", WorkersHandler),
    (r"/nbqueue/api/workers/(?P<pid>[0-9]+)/?", WorkersHandler),
]
