"""The ``nbqueue`` command: a thin layer over TaskQueue and the report and transfer modules.

Exit codes: 0 ok, 1 tasks failed (reported), 2 usage or connection errors. Errors print as one
line; ``--debug`` shows the traceback. Every read command takes ``--json``. A queue URL without
a scheme is an fq:// path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import defaults
from .backends.base import Counts
from .errors import NbQueueError, QueueURLError

EXIT_OK, EXIT_TASKS_FAILED, EXIT_USAGE = 0, 1, 2
#: Every count a Counts holds, stored or read from the queue's structures (scheduled).
SHOWN_COUNTS = tuple(Counts().as_dict())


def _queue(args: argparse.Namespace, url: str | None = None):
    from .queue import TaskQueue

    return TaskQueue(url or args.url, insecure=args.insecure)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text)


def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _titled(ident: str, name: str | None) -> str:
    """An id, and its name when it has its own."""
    return ident if name in (None, ident) else f"{ident}  {name}"


def _error_line(error: dict) -> str:
    return f"{error['type']}: {error['message']}"


# -- workers ---------------------------------------------------------------------------------------
def _env_urls() -> list[str]:
    """The queue URLs a worker process got in its environment (see ``worker_env``)."""
    return [url for url in os.environ.get(defaults.ENV_URL, "").split("\n") if url]


def cmd_worker(args: argparse.Namespace) -> int:
    from .procs import WorkerProcesses
    from .worker import Worker, worker_command, worker_env

    # One set of options, for the child processes of -p N and for a worker in this process.
    options = dict(
        lease_seconds=args.lease,
        burst=args.burst,
        max_tasks=args.max_tasks,
        max_attempts=args.max_attempts,
        idle_exit=args.idle_exit,
        only_by_reference=args.only_by_reference,
        renewal=args.renew,
        concurrency=args.concurrency,
        task_timeout=args.task_timeout,
        echo_output=args.echo_output,
    )
    urls = args.url or _env_urls()
    if args.processes > 1:
        cmd = worker_command(insecure=args.insecure, **options)
        pool = WorkerProcesses(cmd, args.processes, restart=True, env=worker_env(*urls) if urls else None)
        stop = threading.Event()

        def on_signal(signum, frame):
            stop.set()

        import signal

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        pool.supervise(stop)
        pool.stop()
        return EXIT_OK
    logging.basicConfig(level=logging.WARNING, format="nbqueue worker %(process)d: %(message)s")
    if not urls:
        raise QueueURLError(f"no queue URL given and ${defaults.ENV_URL} is not set")
    first, *also = (_queue(args, url) for url in urls)
    worker = Worker(first, also=also, **options)
    worker.install_signal_handlers()
    stats = worker.run()
    worker.backend.close()
    if args.verbose:
        print(
            f"worker {worker.who}: {stats.completed} completed, {stats.failed} failed "
            f"({stats.dead} dead), {stats.abandoned} abandoned, {stats.refused} refused, "
            f"{stats.released} released in {stats.elapsed:.1f}s",
            file=sys.stderr,
        )
    return EXIT_OK


# -- reading ---------------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from .report import queue_status

    status = queue_status(_queue(args))
    age = status["oldest_queued_age"]
    leases = [f"{lease['task_id']} in {lease['expires_in']:.1f}s" for lease in status["leases_expiring"]]
    workers = [f"{w['id']} ({w.get('completed', '?')} completed)" for w in status["workers"]]
    lines = [status["url"]] + [f"  {k:<16}{status[k]}" for k in SHOWN_COUNTS]
    lines += [
        f"  {'oldest queued':<16}{'-' if age is None else f'{age:.1f}s ago'}",
        f"  {'leases expiring':<16}{', '.join(leases) or '-'}",
        f"  {'workers seen':<16}{len(workers)}{''.join(f'  {w}' for w in workers)}",
    ]
    _print(args, status, "\n".join(lines))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    from .progress import describe

    tq = _queue(args)
    rows, lines = [], []
    for job in tq.jobs():
        counts = job.counts()
        rows.append(
            {
                "id": job.id,
                "name": job.name,
                "total": job.total,
                "state": job.meta.get("state"),
                "created": job.meta.get("created"),
                **counts.as_dict(),
            }
        )
        lines.append(f"{job.id}  {job.name:<24.24}  {describe(counts, job.total)}")
    _print(args, rows, "\n".join(lines) or "no jobs")
    return EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    from .progress import TaskProgress, describe
    from .report import job_report

    job = job_report(_queue(args), args.job_id, outputs=args.output)
    counts = Counts(**{k: job[k] for k in SHOWN_COUNTS})
    lines = [
        f"job {_titled(job['id'], job['name'])}  ({job['state']})",
        f"  {describe(counts, job['total'], job['running_now'], retrying=True)}",
        f"  ran by         {len(job['workers'])} worker(s)",
        f"  created        {_when(job['created'])}",
        f"  first started  {_when(job['first_started'])}",
        f"  last finished  {_when(job['last_finished'])}",
        f"  errors         {len(job['errors'])}",
    ]
    lines += [
        f"    {e['task_id']}  {_error_line(e)} (after {e['attempts']} attempt(s))" for e in job["errors"]
    ]
    if job["running"]:
        lines.append(f"  running        {len(job['running'])} task(s) reporting progress")
        lines += [f"    {TaskProgress(**p).text()}  on {p['worker']}" for p in job["running"]]
    for printed in job.get("outputs", ()):
        lines.append(f"--- output of task {printed['index']} ({printed['task_id']})")
        lines.append(printed["output"].rstrip("\n"))
    _print(args, job, "\n".join(lines))
    return EXIT_TASKS_FAILED if job["errors"] or job["cancelled"] else EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    from .report import result_row

    tq = _queue(args)
    job = tq.job(args.job_id)
    records = job.records()
    dead = sum(not r.ok for r in records)
    if args.pickle:
        total = job.total
        if total is None or len(records) < total:
            raise ValueError(f"job {job.id} is not finished ({len(records)}/{total}): --pickle needs all")
        data = tq.serializer.dumps([r.value if r.ok else r.error for r in records])
    else:
        data = "".join(json.dumps(result_row(r, job.id)) + "\n" for r in records).encode()
    if args.out:
        with open(args.out, "wb") as f:
            f.write(data)
        print(f"{len(records)} result(s), {dead} dead, written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return EXIT_TASKS_FAILED if dead else EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from .report import inspect_task

    task = inspect_task(_queue(args), args.task_id)
    expires = "" if task["expires_in"] is None else f" (lease expires in {task['expires_in']}s)"
    lines = [
        f"task       {task['task_id']}",
        f"job        {_titled(task['job_id'], task['job_name'])}",
        f"state      {task['state']}{expires}",
        f"attempts   {task['attempts']}",
    ]
    payload = task["payload"]
    if payload is None:
        lines.append("payload    none kept (a completed task keeps only its record)")
    else:
        lines.append(f"payload    {payload['bytes']} bytes, signature {payload['signature']}")
        if "header" in payload:
            lines.append(f"header     {json.dumps(payload['header'])}")
            lines.append(f"function   {payload.get('function') or '-'}  [{payload['kind']}]")
    if task["error"] is not None:
        lines.append(f"error      {_error_line(task['error'])}")
    _print(args, task, "\n".join(lines))
    return EXIT_TASKS_FAILED if task["state"] == "dead" else EXIT_OK


def cmd_dlq(args: argparse.Namespace) -> int:
    from .report import dead_letter_line, dead_letters

    tq = _queue(args)
    ids = args.task_ids or None
    if args.action == "redrive":
        n = tq.redrive(ids)
        _print(args, {"redriven": n}, f"{n} dead letter(s) queued again")
        return EXIT_OK
    if args.action == "purge":
        n = tq.purge_dead(ids)
        _print(args, {"purged": n}, f"{n} dead letter(s) deleted")
        return EXIT_OK
    rows = dead_letters(tq)
    text = "\n".join(dead_letter_line(r) for r in rows)
    _print(args, rows, text or "no dead letters")
    return EXIT_OK


# -- writing ---------------------------------------------------------------------------------------
def cmd_insert(args: argparse.Namespace) -> int:
    from .tasks import load_specs

    if args.file == "-":
        specs = load_specs(sys.stdin, "stdin")
    else:
        with open(args.file, encoding="utf-8") as f:
            specs = load_specs(f, args.file)
    job = _queue(args).insert(specs, name=args.name, progress=False)
    _print(args, {"job_id": job.id, "tasks": job.total}, job.id)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    tq = _queue(args)
    job = tq.job(args.job_id)
    ended = job.cancel(args.task or None)
    counts = job.counts()
    what = (
        f"job {_titled(job.id, job.name)}" if not args.task else f"{len(args.task)} task(s) of job {job.id}"
    )
    text = (
        f"cancelled {what}: {ended} waiting task(s) ended now; {counts.leased} running task(s) are "
        f"told within {defaults.CANCEL_CHECK_SECONDS:g}s (killed after "
        f"{defaults.CANCEL_GRACE_SECONDS:g}s if deaf to it)"
    )
    _print(args, {"job_id": job.id, "ended": ended, "running": counts.leased}, text)
    return EXIT_OK


def cmd_release(args: argparse.Namespace) -> int:
    # Explicit on purpose: without --all only expired leases (python-task-queue's `ptq release`
    # returns every lease; here that takes --all, since it re-runs tasks that are still running).
    tq = _queue(args)
    n = tq.release_all() if args.all else tq.release_expired()
    _print(args, {"released": n}, f"{n} lease(s) returned to the queue")
    return EXIT_OK


def cmd_rezero(args: argparse.Namespace) -> int:
    counts = _queue(args).rezero().as_dict()
    _print(args, counts, "counters recounted: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    tq = _queue(args)
    if not args.yes:
        if not sys.stdin.isatty():
            print("nbqueue purge: refusing to purge without --yes", file=sys.stderr)
            return EXIT_USAGE
        if input(f"delete everything in {tq.url}? [y/N] ").strip().lower() != "y":
            return EXIT_OK
    tq.purge()
    _print(args, {"purged": tq.url}, f"purged {tq.url}")
    return EXIT_OK


def cmd_transfer(args: argparse.Namespace) -> int:
    from .transfer import copy_queue, move_queue

    src, dst = _queue(args, args.src), _queue(args, args.dst)
    verb = move_queue if args.command == "mv" else copy_queue
    report = verb(src, dst, force=args.force).as_dict()
    done = "moved" if args.command == "mv" else "copied"
    summary = ", ".join(f"{what} {n}" for what, n in report.items())
    _print(args, {"from": src.url, "to": dst.url, **report}, f"{done} {src.url} to {dst.url}: {summary}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(tasks=args.tasks, workers=args.workers, directory=args.dir, fail_every=args.fail_every)


# -- parser ---------------------------------------------------------------------------------------
URL_HELP = "queue URL: fq://PATH (or just a path), redis://host:port/db?queue=NAME, mem://NAME"
POSITIONALS = {
    "url": URL_HELP,
    "src": "source queue URL",
    "dst": "destination queue URL",
    "job_id": "job id",
    "task_id": "task id (<job id>-<index>)",
    "file": "a JSON lines file, or - for stdin",
    "action": "list, redrive or purge",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbqueue", description="Queue notebook work onto worker processes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    # Shared options, declared once. SUPPRESS keeps a --debug given before the command from
    # being reset by the command's own default.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    queue_options = argparse.ArgumentParser(add_help=False)
    queue_options.add_argument("--insecure", action="store_true", help="do not sign or check signatures")
    json_option = argparse.ArgumentParser(add_help=False)
    json_option.add_argument("--json", action="store_true", help="print JSON")

    def command(
        name: str, fn: Callable, help: str, *positionals: str, queue: bool = True, json_out: bool = True
    ) -> argparse.ArgumentParser:
        parents = [debug] + [queue_options] * queue + [json_option] * json_out
        p = sub.add_parser(name, help=help, description=help, parents=parents)
        for arg in positionals:
            choices = ("list", "redrive", "purge") if arg == "action" else None
            p.add_argument(arg, help=POSITIONALS[arg], choices=choices)
        p.set_defaults(fn=fn)
        return p

    w = command("worker", cmd_worker, "run tasks from a queue", json_out=False)
    w.add_argument(
        "url",
        nargs="*",
        default=[],
        help=URL_HELP + " (default: $NBQUEUE_URL); with several, a task of the first that has one, "
        "always (one queue per priority, or per kind of machine)",
    )
    w.add_argument("-p", "--processes", type=int, default=1, help="worker processes (default 1)")
    w.add_argument("--lease", type=float, default=defaults.LEASE_SECONDS, help="lease seconds")
    w.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    w.add_argument("--max-tasks", type=int, default=None, help="exit after this many tasks")
    w.add_argument("--max-attempts", type=int, default=defaults.MAX_ATTEMPTS, help="attempts before dead")
    w.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    w.add_argument(
        "--only-by-reference",
        action="store_true",
        help="run only tasks by reference (installed code); refuse every task that ships a pickle",
    )
    w.add_argument(
        "--renew",
        choices=["process", "thread"],
        default="process",
        help="renew leases from a keeper process (default: safe with tasks that hold the GIL) or a thread",
    )
    w.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="async def tasks one worker process runs at once on its event loop (default 1)",
    )
    w.add_argument(
        "--task-timeout",
        type=float,
        default=None,
        help="seconds a task may run unless its job or function sets a limit (default: none)",
    )
    w.add_argument(
        "--echo-output",
        action="store_true",
        help="also print what tasks print here (it is kept with each task's record either way)",
    )
    w.add_argument("-v", "--verbose", action="store_true", help="print a summary on exit")

    command("status", cmd_status, "counters, oldest queued task, leases expiring soon, workers seen", "url")
    command("jobs", cmd_jobs, "list the queue's jobs", "url")
    j = command("job", cmd_job, "one job: counts, timings, errors (exit 1 if tasks failed)", "url", "job_id")
    j.add_argument("--output", action="store_true", help="also what each finished task printed")
    r = command(
        "results", cmd_results, "a job's results as JSON lines (exit 1 if tasks failed)", "url", "job_id"
    )
    r.add_argument("--out", default=None, help="write to this file instead of stdout")
    r.add_argument(
        "--pickle", action="store_true", help="write a pickle of the list of values (failed: their TaskError)"
    )
    command(
        "inspect",
        cmd_inspect,
        "one task: state, attempts, header, payload size and function, error (loads nothing)",
        "url",
        "task_id",
    )
    d = command("dlq", cmd_dlq, "list, redrive or purge dead letters", "action", "url")
    d.add_argument("task_ids", nargs="*", help="only these tasks (default: all)")

    i = command(
        "insert",
        cmd_insert,
        'queue one job of JSON task specs, one per line ({"fn": "pkg.mod:func", "args": [...], '
        '"kwargs": {...}}), checked before anything is queued; prints the job id',
        "url",
        "file",
    )
    i.add_argument("--name", default=None, help="the job's name")
    ca = command(
        "cancel",
        cmd_cancel,
        "cancel a job for good: waiting tasks never start, running ones get nbqueue.Cancelled raised "
        "inside them (their process is killed if they do not stop)",
        "url",
        "job_id",
    )
    ca.add_argument("--task", action="append", default=[], help="only this task (repeat for several)")
    r = command("release", cmd_release, "return expired leases to the queue", "url")
    r.add_argument("--all", action="store_true", help="release every lease, live or not")
    command("rezero", cmd_rezero, "recount the counters exactly", "url")
    pu = command("purge", cmd_purge, "delete everything in the queue", "url")
    pu.add_argument("--yes", action="store_true", help="do not ask")
    copy_help = (
        "copy jobs, functions, tasks, dead letters and results to another queue of any backend, "
        "keeping ids; refused while tasks are leased unless --force"
    )
    for name, help in (("cp", copy_help), ("mv", "cp, then purge the source")):
        t = command(name, cmd_transfer, help, "src", "dst")
        t.add_argument(
            "--force",
            action="store_true",
            help="copy even while tasks are leased: they are queued again in the destination",
        )

    demo = command("demo", cmd_demo, "run a demo job on a temporary fq:// queue", queue=False, json_out=False)
    demo.add_argument("--tasks", type=int, default=3000, help="tasks to run (default 3000)")
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    demo.add_argument("--dir", default=None, help="queue directory (default: a new temporary one)")
    demo.add_argument(
        "--fail-every", type=int, default=0, help="make every Nth task fail (shows dead letters)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nbqueue`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (NbQueueError, OSError, KeyError, ValueError) as exc:
        if args.debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"nbqueue {args.command}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
