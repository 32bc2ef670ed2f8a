"""The jupyter-server extension against a real server: REST API, auth, bad input, workers."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time

import pytest
from tornado.httpclient import HTTPClientError

from nbqueue import TaskQueue
from nbqueue.server.registry import queue_id

from .helpers import notebook
from .redis_server import RedisServer

NB = """
import time
from nbqueue import queueable, Terminal, current_task

@queueable
def steps(n):
    for k in range(n):
        current_task().progress(k, n, f"step {k}")
        time.sleep(0.2)
    return n

@queueable
def square(i):
    if i == 4:
        print("checking", i)
        raise Terminal("four is right out")
    return i * i
"""


@pytest.fixture
def queue_url(tmp_path):
    return f"fq://{tmp_path / 'queue'}"


@pytest.fixture
def jp_server_config(queue_url):
    return {
        "ServerApp": {"jpserver_extensions": {"nbqueue": True}},
        "NbQueue": {"queues": [queue_url], "max_local_workers": 3},
    }


async def get(jp_fetch, *parts):
    response = await jp_fetch("nbqueue", "api", *parts)
    return json.loads(response.body)


async def send(jp_fetch, method, *parts, body=None):
    response = await jp_fetch(
        "nbqueue", "api", *parts, method=method, body=json.dumps(body or {}), allow_nonstandard_methods=True
    )
    return response.code, json.loads(response.body)


def insert_job(url: str, n: int = 6):
    nb = notebook(NB)
    return TaskQueue(url).insert(
        (functools.partial(nb.square, i) for i in range(n)),
        name="squares",
        source="square(i) for i in range(6)",
        progress=False,
    )


async def test_queues_jobs_and_job_detail(jp_fetch, queue_url):
    job = insert_job(queue_url)
    TaskQueue(queue_url).poll(burst=True)
    (queue,) = await get(jp_fetch, "queues")
    qid = queue_id(queue_url)
    assert queue["id"] == qid and queue["counts"]["completed"] == 5 and queue["counts"]["dead"] == 1
    assert queue["running_now"] == 0  # from the workers' heartbeats: what executes now
    (row,) = await get(jp_fetch, "queues", qid, "jobs")
    assert (row["id"], row["name"], row["total"], row["state"]) == (job.id, "squares", 6, "inserted")
    detail = await get(jp_fetch, "queues", qid, "jobs", job.id)
    assert detail["counts"]["completed"] == 5 and detail["source"] == "square(i) for i in range(6)"
    (error,) = detail["errors"]
    assert (error["type"], error["message"]) == ("Terminal", "four is right out")
    assert "Traceback" in error["traceback"] and "nbqueue/worker.py" not in error["traceback"]
    assert "nbqueue/worker.py" in error["full_traceback"] and error["output"] == "checking 4\n"


async def test_a_job_reads_queued_running_finished_and_its_failures_retry_over_rest(jp_fetch, queue_url):
    job = insert_job(queue_url)
    qid = queue_id(queue_url)
    (row,) = await get(jp_fetch, "queues", qid, "jobs")
    assert row["status"] == "queued" and row["running_now"] == 0 and row["workers"] == 0
    TaskQueue(queue_url).poll(burst=True, echo_output=False)
    (row,) = await get(jp_fetch, "queues", qid, "jobs")
    assert row["status"] == "finished" and row["state"] == "inserted" and row["workers"] == 1
    code, reply = await send(jp_fetch, "POST", "queues", qid, "jobs", job.id, "retry")
    assert code == 200 and reply == {"job_id": job.id, "retried": 1}  # the dead one runs again
    (row,) = await get(jp_fetch, "queues", qid, "jobs")
    assert row["status"] == "running" and row["counts"]["queued"] == 1
    job.cancel()
    (row,) = await get(jp_fetch, "queues", qid, "jobs")
    assert row["status"] == "cancelled"


async def test_a_hung_redis_never_stalls_the_server(jp_fetch, tmp_path):
    """Handlers do their storage I/O off the server's event loop: with the queue's Redis paused
    (SIGSTOP), the dashboard's request waits, and the server's own /api/status still answers."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        code, added = await send(jp_fetch, "POST", "queues", body={"url": redis.url("paused")})
        assert code == 201 and added["error"] is None
        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            stuck = asyncio.ensure_future(jp_fetch("nbqueue", "api", "queues", request_timeout=60))
            await asyncio.sleep(0.5)  # in its handler, waiting for Redis
            started = time.monotonic()
            status = await jp_fetch("api", "status", request_timeout=5)
            assert status.code == 200 and time.monotonic() - started < 1.0
            assert not stuck.done()
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        rows = json.loads((await stuck).body)  # answered once Redis is back
        assert {row["url"] for row in rows} >= {redis.url("paused")}
    finally:
        redis.stop()


async def test_dead_letters_and_redrive(jp_fetch, queue_url):
    insert_job(queue_url)
    TaskQueue(queue_url).poll(burst=True)
    qid = queue_id(queue_url)
    (letter,) = await get(jp_fetch, "queues", qid, "dead")
    assert letter["type"] == "Terminal" and "payload" not in letter
    code, reply = await send(jp_fetch, "POST", "queues", qid, "dead", "redrive")
    assert code == 200 and reply == {"redriven": 1}
    assert TaskQueue(queue_url).status().queued == 1


async def test_bad_input_gets_4xx_with_a_message(jp_fetch, queue_url):
    with pytest.raises(HTTPClientError) as info:
        await get(jp_fetch, "queues", "0123456789ab", "jobs")
    assert info.value.code == 404
    with pytest.raises(HTTPClientError) as info:
        await get(jp_fetch, "queues", queue_id(queue_url), "jobs", "nosuchjob")
    assert info.value.code == 404
    for body, code in [
        ("{not json", 400),
        (json.dumps({"queue": queue_id(queue_url), "n": -2}), 400),
        (json.dumps({"n": 1}), 400),
        (json.dumps({"queue": "0123456789ab", "n": 1}), 404),
        (json.dumps({"queue": queue_id(queue_url), "n": 9}), 409),
    ]:
        with pytest.raises(HTTPClientError) as info:
            await jp_fetch("nbqueue", "api", "workers", method="POST", body=body)
        assert info.value.code == code, body
        assert json.loads(info.value.response.body)["message"]
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("nbqueue", "api", "queues", method="POST", body=json.dumps({"url": "sqs://nope"}))
    assert info.value.code == 400
    assert "unknown queue scheme" in json.loads(info.value.response.body)["message"]


async def test_every_route_needs_authentication(jp_fetch, http_server_client, jp_base_url, queue_url):
    qid = queue_id(queue_url)
    for path in [
        "nbqueue/api/queues",
        f"nbqueue/api/queues/{qid}/jobs",
        f"nbqueue/api/queues/{qid}/dead",
        "nbqueue/api/workers",
    ]:
        response = await http_server_client.fetch(jp_base_url + path, raise_error=False)
        assert response.code == 403, path
    page = await http_server_client.fetch(jp_base_url + "nbqueue", raise_error=False, follow_redirects=False)
    assert page.code in (302, 403)  # the page sends a browser to the login form
    response = await http_server_client.fetch(
        jp_base_url + "nbqueue/api/workers",
        method="POST",
        body=json.dumps({"queue": qid, "n": 1}),
        raise_error=False,
    )
    assert response.code == 403


async def test_passwords_never_appear_in_responses(jp_fetch, redis_server):
    url = redis_server.url("secretive", userinfo="someone:hunter2@")
    with pytest.raises(HTTPClientError) as info:  # the private server has no such user
        await jp_fetch("nbqueue", "api", "queues", method="POST", body=json.dumps({"url": url}))
    assert info.value.code == 400 and b"hunter2" not in info.value.response.body
    listing = await jp_fetch("nbqueue", "api", "queues")
    assert b"hunter2" not in listing.body


@pytest.mark.slow
async def test_server_owned_workers_run_a_job_and_stop(jp_fetch, queue_url):
    job = insert_job(queue_url, n=20)
    qid = queue_id(queue_url)
    code, started = await send(jp_fetch, "POST", "workers", body={"queue": qid, "n": 2})
    assert code == 201 and len(started["pids"]) == 2
    for _ in range(300):
        if job.done():
            break
        await asyncio.sleep(0.1)
    detail = await get(jp_fetch, "queues", qid, "jobs", job.id)
    assert detail["counts"]["completed"] == 19 and detail["counts"]["dead"] == 1
    workers = await get(jp_fetch, "workers")
    assert sorted(w["pid"] for w in workers) == sorted(started["pids"]) and all(w["alive"] for w in workers)
    code, stopped = await send(jp_fetch, "DELETE", "workers", str(started["pids"][0]))
    assert stopped == {"stopped": 1}
    code, stopped = await send(jp_fetch, "DELETE", "workers")
    assert stopped == {"stopped": 1}
    assert not any(w["alive"] for w in await get(jp_fetch, "workers"))


async def test_dashboard_page_is_served(jp_fetch):
    page = await jp_fetch("nbqueue")
    html = page.body.decode()
    assert "<title>nbqueue</title>" in html and "{{base_url}}" not in html and "nbqueue/api/" in html


def test_extension_point_names_the_app():
    import nbqueue
    from nbqueue.server.app import NbQueue

    assert nbqueue._jupyter_server_extension_points() == [{"module": "nbqueue.server.app", "app": NbQueue}]


async def test_cancel_a_job_over_rest(jp_fetch, queue_url):
    job = insert_job(queue_url)
    qid = queue_id(queue_url)
    code, reply = await send(
        jp_fetch, "POST", "queues", qid, "jobs", job.id, "cancel", body={"task_ids": [f"{job.id}-0"]}
    )
    assert code == 200 and reply == {"job_id": job.id, "ended": 1}
    code, reply = await send(jp_fetch, "POST", "queues", qid, "jobs", job.id, "cancel")
    assert code == 200 and reply["ended"] == 5
    detail = await get(jp_fetch, "queues", qid, "jobs", job.id)
    assert detail["counts"]["cancelled"] == 6
    for parts, body, status in [
        (("nosuchjob", "cancel"), {}, 404),
        ((job.id, "cancel"), {"task_ids": "all"}, 400),
        ((job.id, "cancel"), {"task_ids": ["other-1"]}, 400),
    ]:
        with pytest.raises(HTTPClientError) as info:
            await send(jp_fetch, "POST", "queues", qid, "jobs", *parts, body=body)
        assert info.value.code == status


async def test_the_job_route_shows_running_tasks_own_progress(jp_fetch, queue_url):
    tq = TaskQueue(queue_url)
    job = tq.insert([functools.partial(notebook(NB).steps, 15)], progress=False)
    workers = tq.spawn_workers(1)
    try:
        running = []
        for _ in range(200):
            running = (await get(jp_fetch, "queues", queue_id(queue_url), "jobs", job.id))["running"]
            if running:
                break
            await asyncio.sleep(0.05)
        (progress,) = running
        assert progress["task_id"] == f"{job.id}-0" and progress["total"] == 15
        assert progress["note"].startswith("step ") and progress["worker"]
        job.cancel()
    finally:
        workers.stop()
