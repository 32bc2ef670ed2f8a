"""The ``nbqueue`` command: a thin layer over TaskQueue.

Exit codes: 0 ok, 1 tasks failed (reported), 2 usage or connection errors. Errors print as one
line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable

from . import defaults
from .errors import NbQueueError

EXIT_OK, EXIT_TASKS_FAILED, EXIT_USAGE = 0, 1, 2


def _queue(args: argparse.Namespace):
    from .queue import TaskQueue

    return TaskQueue(args.url, insecure=getattr(args, "insecure", False))


def _print(args: argparse.Namespace, data, text: str) -> None:
    print(json.dumps(data, indent=None if args.json else 2) if args.json else text)


# -- commands --------------------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import Worker, WorkerProcesses, worker_command

    if args.processes > 1:
        cmd = worker_command(
            args.url,
            lease_seconds=args.lease,
            burst=args.burst,
            max_tasks=args.max_tasks,
            max_attempts=args.max_attempts,
            idle_exit=args.idle_exit,
            insecure=args.insecure,
        )
        pool = WorkerProcesses(cmd, args.processes, restart=True)
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
    worker = Worker(
        _queue(args),
        lease_seconds=args.lease,
        max_attempts=args.max_attempts,
        burst=args.burst,
        max_tasks=args.max_tasks,
        idle_exit=args.idle_exit,
    )
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


def cmd_status(args: argparse.Namespace) -> int:
    tq = _queue(args)
    counts = tq.status().as_dict()
    text = f"{tq.url}\n" + "\n".join(f"  {k:<10}{v:>10}" for k, v in counts.items())
    _print(args, {"url": tq.url, **counts}, text)
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


def cmd_dlq(args: argparse.Namespace) -> int:
    from .backends.base import job_of
    from .records import open_record

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
    rows = []
    for letter in tq.dead():
        error = {"type": "?", "message": "", "traceback": ""}
        if letter.error is not None and not letter.task_id.startswith("quarantine/"):
            try:
                rec = open_record(
                    tq.signer, tq.serializer, letter.task_id, letter.error, job_of(letter.task_id)
                )
                if rec.error is not None:
                    error = {
                        "type": rec.error.type,
                        "message": rec.error.message,
                        "traceback": rec.error.traceback,
                    }
            except NbQueueError as exc:
                error = {"type": type(exc).__name__, "message": str(exc), "traceback": ""}
        elif letter.error is not None:
            error = {
                "type": "Quarantined",
                "message": letter.error.decode("utf-8", "replace"),
                "traceback": "",
            }
        rows.append(
            {"task_id": letter.task_id, "attempts": letter.attempts, "bytes": len(letter.payload), **error}
        )
    text = "\n".join(f"{r['task_id']}  attempts={r['attempts']}  {r['type']}: {r['message']}" for r in rows)
    _print(args, rows, text or "no dead letters")
    return EXIT_OK


def cmd_release(args: argparse.Namespace) -> int:
    n = _queue(args).release_all(force=args.all)
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
            print("refusing to purge without --yes", file=sys.stderr)
            return EXIT_USAGE
        if input(f"delete everything in {tq.url}? [y/N] ").strip().lower() != "y":
            return EXIT_OK
    tq.purge()
    _print(args, {"purged": tq.url}, f"purged {tq.url}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(tasks=args.tasks, workers=args.workers, directory=args.dir, fail_every=args.fail_every)


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbqueue", description="Queue notebook work onto worker processes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_url(p: argparse.ArgumentParser) -> None:
        p.add_argument("url", help="queue URL (fq://PATH, redis://..., or a path)")
        p.add_argument("--insecure", action="store_true", help="do not sign or check signatures")

    def command(name: str, fn: Callable, help: str, url: bool = True, json_flag: bool = True):
        p = sub.add_parser(name, help=help, description=help)
        if url:
            add_url(p)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(fn=fn)
        return p

    w = command("worker", cmd_worker, "run tasks from a queue", json_flag=False)
    w.add_argument("-p", "--processes", type=int, default=1, help="worker processes (default 1)")
    w.add_argument("--lease", type=float, default=defaults.LEASE_SECONDS, help="lease seconds")
    w.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    w.add_argument("--max-tasks", type=int, default=None, help="exit after this many tasks")
    w.add_argument("--max-attempts", type=int, default=defaults.MAX_ATTEMPTS, help="attempts before dead")
    w.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    w.add_argument("-v", "--verbose", action="store_true", help="print a summary on exit")

    command("status", cmd_status, "show the queue's counters")
    command("jobs", cmd_jobs, "list the queue's jobs")
    d = command("dlq", cmd_dlq, "list, redrive or purge dead letters", url=False)
    d.add_argument("action", choices=["list", "redrive", "purge"], help="what to do")
    add_url(d)
    d.add_argument("task_ids", nargs="*", help="only these tasks (default: all)")
    r = command("release", cmd_release, "return expired leases to the queue")
    r.add_argument("--all", action="store_true", help="release every lease, live or not")
    command("rezero", cmd_rezero, "recount the counters exactly")
    pu = command("purge", cmd_purge, "delete everything in the queue")
    pu.add_argument("--yes", action="store_true", help="do not ask")

    demo = command("demo", cmd_demo, "run a demo job on a temporary fq:// queue", url=False, json_flag=False)
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
