"""REST handlers under ``{base_url}/nbqueue/api/`` and the dashboard page at ``{base_url}/nbqueue``.

Routes (JSON unless said otherwise)::

    GET    /nbqueue                                   the dashboard (HTML)
    GET    /nbqueue/api/queues                        queues with their counts
    POST   /nbqueue/api/queues            {"url"}     show another queue; returns its id
    GET    /nbqueue/api/queues/<qid>/jobs             the queue's jobs with counts
    GET    /nbqueue/api/queues/<qid>/jobs/<job>       one job: counts, timing, recent errors, source
    POST   /nbqueue/api/queues/<qid>/jobs/<job>/cancel  {"task_ids"?}  cancel it (or those tasks)
    POST   /nbqueue/api/queues/<qid>/jobs/<job>/retry   run its failed and cancelled tasks again
    GET    /nbqueue/api/queues/<qid>/dead             dead letters (no payloads)
    POST   /nbqueue/api/queues/<qid>/dead/redrive     queue them again
    GET    /nbqueue/api/workers                       worker processes the server started
    POST   /nbqueue/api/workers       {"queue"|"url", "n", "origin"?}   start n workers on a queue
    DELETE /nbqueue/api/workers[/<pid>]               stop all of them, or one

Every handler does its storage I/O on a thread of its own pool, never on the server's event loop:
a hung Redis or a slow shared file system stalls the dashboard's requests, not every notebook the
server runs.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from importlib import resources
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from tornado import web

from ..errors import NbQueueError
from ..jobs import Job, running_by_worker
from ..progress import running_shown
from ..queue import TaskQueue
from ..report import dead_letters, job_status
from .registry import QueueRegistry

AUTH_RESOURCE = "nbqueue"
#: Errors a job page lists, newest first.
RECENT_ERRORS = 20
#: Threads for the handlers' storage calls: their own pool, so requests stuck on a storage that
#: does not answer never take the threads the server's other work runs on.
STORAGE_THREADS = 8
_storage = ThreadPoolExecutor(max_workers=STORAGE_THREADS, thread_name_prefix="nbqueue-storage")


async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a storage thread, awaited: the event loop serves other requests meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(_storage, functools.partial(fn, *args))


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
    """A queue as the API shows it (the URL comes from the backend: password redacted), with
    ``running_now``: its tasks executing now by the workers' heartbeats, never more than their
    slots (``counts.leased`` also holds the tasks workers leased ahead)."""
    try:
        counts = tq.status()
        running = sum(len(tasks) for tasks in running_by_worker(tq.backend.workers()).values())
        summary = {"counts": counts.as_dict(), "running_now": running_shown(counts, running)}
        return {"id": qid, "url": tq.url, **summary, "error": None}
    except NbQueueError as exc:
        return {"id": qid, "url": tq.url, "counts": None, "running_now": None, "error": str(exc)}


def job_summary(job, workers: dict[str, bytes] | None = None) -> dict[str, Any]:
    """A job as the API lists it: its state as a user reads it (``job_status``), counts, the
    tasks running now and the workers that ran it (``workers``: ``Backend.workers()``, read once
    for a whole list)."""
    meta, counts = job.meta, job.counts()
    return {
        "id": job.id, "name": job.name, "state": meta.get("state"), "total": job.total,
        "status": job_status(meta.get("state"), counts, job.total),
        "created": meta.get("created"), "counts": counts.as_dict(),
        "running_now": None if workers is None else running_shown(counts, job.running_now(workers)),
        "workers": None if workers is None else len(job.workers_ran(workers)),
    }  # fmt: skip


def _jobs_of(tq) -> list[dict[str, Any]]:
    try:
        workers = tq.backend.workers()
    except NbQueueError:
        workers = None
    return [job_summary(job, workers) for job in tq.jobs()]


class QueuesHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        items = self.registry.items()
        self.reply(await off_loop(lambda: [queue_summary(qid, tq) for qid, tq in items]))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        url = self.body().get("url")
        if not isinstance(url, str) or not url:
            raise web.HTTPError(400, 'give the queue as {"url": "fq://..."}')
        try:
            qid = await off_loop(self.registry.add, url)  # opening a queue touches its storage
        except NbQueueError as exc:
            raise web.HTTPError(400, str(exc)) from None
        self.reply(await off_loop(queue_summary, qid, self.registry.get(qid)), status=201)


class JobsHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self, qid: str) -> None:
        self.reply(await off_loop(_jobs_of, self.queue(qid)))


def _job_detail(tq: TaskQueue, job: Job) -> dict[str, Any]:
    workers = tq.backend.workers()
    data = job_summary(job, workers)
    data["source"] = job.meta.get("source")
    data["errors"] = dead_letters(tq, job.id, RECENT_ERRORS)
    data["running"] = [asdict(p) for p in job.running_progress(workers)]
    return data


class _JobBase(_Base):
    async def on_job(self, qid: str, job_id: str, fn: Callable[[TaskQueue, Job], Any]) -> Any:
        """``fn(queue, job)`` off the event loop; 404 when the queue has no such job."""
        tq = self.queue(qid)
        try:
            return await off_loop(lambda: fn(tq, tq.job(job_id)))
        except (KeyError, ValueError):
            raise web.HTTPError(404, f"no job {job_id!r} in this queue") from None


class JobHandler(_JobBase):
    @web.authenticated
    @authorized
    async def get(self, qid: str, job_id: str) -> None:
        self.reply(await self.on_job(qid, job_id, _job_detail))


class RetryHandler(_JobBase):
    @web.authenticated
    @authorized
    async def post(self, qid: str, job_id: str) -> None:
        self.reply({"job_id": job_id, "retried": await self.on_job(qid, job_id, lambda tq, job: job.retry())})


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
            ended = await off_loop(tq.cancel, job_id, ids)
        except KeyError:
            raise web.HTTPError(404, f"no job {job_id!r} in this queue") from None
        except ValueError as exc:
            raise web.HTTPError(400, str(exc)) from None
        self.reply({"job_id": job_id, "ended": ended})


class DeadHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self, qid: str) -> None:
        self.reply(await off_loop(dead_letters, self.queue(qid)))


class RedriveHandler(_Base):
    @web.authenticated
    @authorized
    async def post(self, qid: str) -> None:
        ids = self.body().get("task_ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(t, str) for t in ids)):
            raise web.HTTPError(400, "task_ids must be a list of task ids")
        self.reply({"redriven": await off_loop(self.queue(qid).redrive, ids)})


class WorkersHandler(_Base):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.registry.workers())

    @web.authenticated
    @authorized
    async def post(self) -> None:
        data = self.body()
        n = data.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise web.HTTPError(400, "n must be a positive whole number of workers")
        qid = data.get("queue")
        if qid is None and isinstance(data.get("url"), str):
            try:
                qid = await off_loop(self.registry.add, data["url"])
            except NbQueueError as exc:
                raise web.HTTPError(400, str(exc)) from None
        if not isinstance(qid, str):
            raise web.HTTPError(400, 'give the queue as {"queue": ID} or {"url": URL}')
        origin = data.get("origin", "api")
        if origin not in ("api", "kernel"):
            raise web.HTTPError(400, 'origin is "api" or "kernel"')
        self.queue(qid)
        try:
            group = await off_loop(self.registry.start_workers, qid, n, origin)
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
    (rf"/nbqueue/api/queues/{_Q}/jobs/(?P<job_id>[A-Za-z0-9_]+)/retry/?", RetryHandler),
    (rf"/nbqueue/api/queues/{_Q}/dead/?", DeadHandler),
    (rf"/nbqueue/api/queues/{_Q}/dead/redrive/?", RedriveHandler),
    (r"/nbqueue/api/workers/?", WorkersHandler),
    (r"/nbqueue/api/workers/(?P<pid>[0-9]+)/?", WorkersHandler),
]
