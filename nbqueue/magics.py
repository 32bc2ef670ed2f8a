"""IPython magics: ``%%queue`` fans a cell out over parameters, ``%queue`` shows and steers queues.

Load with ``%load_ext nbqueue`` (loading again is harmless).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import itertools
import keyword
import linecache
import os
import sys
import types
from functools import partial
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from . import defaults
from .errors import NbQueueError
from .handles import queueable
from .jobs import PENDING, save_job_record
from .procs import WorkerProcesses
from .queue import TaskQueue, last_used_url, note_used
from .records import TaskError

_BUILTINS = frozenset(dir(builtins))


# -- turning a cell into a task function ----------------------------------------------------------
def split_args(line: str) -> list[str]:
    """Split a magic's line on spaces outside brackets and quotes, so ``--map a=[1, 2]`` is one
    token. A token that is entirely quoted loses its quotes."""
    tokens: list[str] = []
    buf: list[str] = []
    depth, quote = 0, None
    for ch in line:
        if quote:
            buf.append(ch)
            quote = None if ch == quote else quote
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch.isspace() and depth <= 0:
            if buf:
                tokens.append("".join(buf))
                buf = []
            continue
        buf.append(ch)
    if buf:
        tokens.append("".join(buf))
    return [t[1:-1] if len(t) > 1 and t[0] == t[-1] and t[0] in "'\"" else t for t in tokens]


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name the cell binds anywhere (assignments, defs, imports, loop and handler names)."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return bound


def cell_function(cell: str, params: list[str], namespace: dict[str, Any]) -> types.FunctionType:
    """Compile a cell into a queueable function of ``params`` whose globals are ``namespace``.

    The value of the cell's last expression is returned (None if it ends in a statement).

    Raises:
        UsageError: a syntax error, or a name that is defined nowhere (with its cell line).
    """
    # A file name of its own, with the cell's lines in linecache (as IPython does for cells):
    # tracebacks, here and on a worker (the lines travel with the function), show the cell.
    filename = f"<%%queue cell {hashlib.sha1(cell.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(cell), None, cell.splitlines(True), filename)
    try:
        tree = ast.parse(cell, filename=filename)
    except SyntaxError as exc:
        raise UsageError(f"%%queue cell, line {exc.lineno}: {exc.msg}") from None
    known = _bound_names(tree) | set(params) | set(namespace) | _BUILTINS
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in known:
            raise UsageError(f"%%queue cell, line {node.lineno}: name {node.id!r} is not defined")
    body = tree.body or [ast.Pass()]
    if isinstance(body[-1], ast.Expr):
        body[-1] = ast.copy_location(ast.Return(value=body[-1].value), body[-1])
    args = ast.arguments(
        posonlyargs=[], args=[ast.arg(arg=p) for p in params], kwonlyargs=[], kw_defaults=[], defaults=[]
    )
    extra: dict[str, Any] = {"type_params": []} if sys.version_info >= (3, 12) else {}
    definition = ast.FunctionDef(name="queued_cell", args=args, body=body, decorator_list=[], **extra)
    module = ast.fix_missing_locations(ast.Module(body=[definition], type_ignores=[]))
    code = compile(module, filename, "exec")
    fn_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    # The notebook's namespace is the function's globals: dill ships exactly the globals it reads.
    return queueable(types.FunctionType(fn_code, namespace, "queued_cell"))


def parameter_grid(maps: list[str], namespace: dict[str, Any], zipped: bool) -> tuple[list[str], list[dict]]:
    """``["alpha=[1, 2]", "seed=range(3)"]`` → names and one kwargs dict per task."""
    names: list[str] = []
    values: list[list] = []
    for item in maps:
        name, sep, expr = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or keyword.iskeyword(name):
            raise UsageError(f"--map {item!r}: write --map NAME=EXPR with NAME a Python identifier")
        if name in names:
            raise UsageError(f"--map {name} is given twice")
        try:
            values.append(list(eval(expr, namespace)))  # the user's own expression, in their namespace
        except Exception as exc:
            raise UsageError(f"--map {name}={expr}: {type(exc).__name__}: {exc}") from None
        names.append(name)
    if zipped and len({len(v) for v in values}) > 1:
        lengths = ", ".join(f"{n}={len(v)}" for n, v in zip(names, values, strict=True))
        raise UsageError(f"--zip needs equally long --map values ({lengths})")
    combos = zip(*values, strict=True) if zipped else itertools.product(*values)
    return names, [dict(zip(names, combo, strict=True)) for combo in combos]


def _take_option(words: list[str], name: str, usage: str) -> tuple[list[str], list[str]]:
    """The values of every ``name VALUE`` in a line magic's words, and the words left."""
    values, rest = [], list(words)
    while name in rest:
        i = rest.index(name)
        if i + 1 >= len(rest):
            raise UsageError(usage)
        values.append(rest[i + 1])
        del rest[i : i + 2]
    return values, rest


def _workers_alive(pool: WorkerProcesses, job: Any) -> None:
    """Stop a --wait whose own workers are all gone while the job is unfinished."""
    if pool.alive() == 0 and not job.done():
        codes = ", ".join(str(p.returncode) for p in pool.procs)
        raise RuntimeError(
            f"the {len(pool.procs)} worker(s) started for job {job.name} exited (codes {codes}) before it "
            "finished; start workers with %queue workers start N, then wait with _job.wait()"
        )


# -- the magics ----------------------------------------------------------------------------------
@magics_class
class QueueMagics(Magics):
    """``%%queue`` and ``%queue``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._queues: dict[str, TaskQueue] = {}
        self._workers: list[WorkerProcesses] = []
        self._server: dict[str, Any] | None = None  # the Jupyter server we run under, once found
        self._server_looked_up = False

    @property
    def _ip(self) -> Any:
        """The IPython shell these magics were registered on (always set once loaded)."""
        assert self.shell is not None, "magics are used only from the shell they were loaded in"
        return self.shell

    def _queue_for(self, url: str | None) -> TaskQueue:
        # The queue last used in this kernel: by a magic, or by an insert of the notebook's own
        # (tq.insert, fn.map), so `%queue workers start 2` serves the job just inserted.
        url = url or last_used_url() or os.environ.get(defaults.ENV_URL)
        if not url:
            url = f"fq://{os.path.join(os.getcwd(), 'queues', 'default')}"
            print(f"nbqueue: using {url} (pass a URL or set {defaults.ENV_URL} to choose another)")
        if url not in self._queues:
            self._queues[url] = TaskQueue(url)
        note_used(self._queues[url].worker_url)  # as another process opens it: fq:// made absolute
        return self._queues[url]

    @magic_arguments()
    @argument(
        "url",
        nargs="?",
        default=None,
        help="queue URL (default: the last one, $NBQUEUE_URL, or ./queues/default)",
    )
    @argument("--map", action="append", default=[], metavar="NAME=EXPR", help="a parameter and its values")
    @argument("--zip", action="store_true", help="pair the --map values instead of crossing them")
    @argument("--name", default=None, help="the job's name")
    @argument("--priority", type=int, default=0, help="workers serve higher-priority jobs first (default 0)")
    @argument("--wait", action="store_true", help="block until done and bind the results to --out")
    @argument("--workers", type=int, default=0, help="start N local workers that stop when the queue drains")
    @argument("--out", default=None, help="variable for the Job (or the results, with --wait)")
    @argument("--retries", type=int, default=None, help="retries per task for the workers started here")
    @argument("--timeout", type=float, default=None, help="with --wait: give up waiting after S seconds")
    @line_cell_magic
    def queue(self, line: str, cell: str | None = None) -> None:
        """Run a cell as many tasks, or show and steer a queue.

        Cell magic: the cell becomes one task function of the --map names (every combination,
        or pairs with --zip). The notebook globals it reads travel with it; the value of its
        last expression is each task's result. ``_job`` is always the Job.

            %%queue fq://./queues/grid --map alpha=[0.1, 1, 10] --map seed=range(5) --wait --out grid
            model = fit(X, y, alpha=alpha, seed=seed)
            model.score(X_test, y_test)

        Line magics:

            %queue status [URL]               counters of the queue
            %queue jobs [URL]                 its jobs, with progress
            %queue job ID [URL]               reattach to a job: its live progress
            %queue workers                    worker processes started from this kernel
            %queue workers start N [URL]      start N local workers
            %queue workers stop               stop them
            %queue results JOB [--out VAR]    bind a job's results (default _results)
            %queue cancel JOB [--task ID]     cancel a job (or some of its tasks) for good
            %queue retry JOB                  run a %%queue cell's failed tasks again, with the
                                              cell's code and the notebook's helpers as they are now
            %queue dlq [list|redrive|purge]   dead letters of the queue
        """
        if cell is None:
            return self._line(line)
        return self._cell(line, cell)

    # -- cell ------------------------------------------------------------------------------------
    def _prompt_number(self) -> int:
        """The number of the cell running now, as its prompt shows it (``[4]``). IPython 8.x
        and later count ``execution_count`` up before the cell runs, earlier ones after; the
        history has stored this cell's input either way."""
        history = getattr(self._ip, "history_manager", None)
        inputs = getattr(history, "input_hist_raw", None)
        return len(inputs) - 1 if inputs else self._ip.execution_count

    def _cell(self, line: str, cell: str) -> None:
        args = self.queue.parser.parse_args(split_args(line))
        ns = self._ip.user_ns
        names, grid = parameter_grid(args.map, ns, args.zip)
        fn = cell_function(cell, names, ns)
        tq = self._queue_for(args.url)
        count = self._prompt_number()
        job = tq.insert(
            (partial(fn, **kwargs) for kwargs in grid),
            total=len(grid),
            name=args.name or f"cell {count}",
            source=cell,
            priority=args.priority,
        )
        ns["_job"] = job
        # What `%queue retry` needs to build the cell's function again, with what the notebook
        # holds then.
        job.meta["parameters"] = names
        save_job_record(tq, job.id, job.meta)
        pool = None
        if args.workers:
            attempts = None if args.retries is None else args.retries + 1
            pool = tq.spawn_workers(args.workers, burst=True, max_attempts=attempts)
            self._workers.append(pool)
        if not args.wait:
            if args.out:
                ns[args.out] = job
            return
        # The stop button cancels the cell's job: what a user stopping a cell means.
        check = None if pool is None else partial(_workers_alive, pool, job)
        job.wait(timeout=args.timeout, check=check, cancel_on_interrupt=True)
        results = job.results(on_error="exception")
        ns[args.out or "_results"] = results
        dead = sum(isinstance(value, TaskError) for value in results)
        if dead:
            print(f"{dead} of {len(results)} tasks are dead: their places hold TaskError; see _job.errors()")

    # -- line ------------------------------------------------------------------------------------
    def _line(self, line: str) -> None:
        words = split_args(line)
        if not words:
            raise UsageError(
                "%queue needs a command: status, jobs, job, workers, results, cancel, retry or dlq "
                "(see %queue?)"
            )
        command, rest = words[0], words[1:]
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            raise UsageError(f"unknown %queue command {command!r} (see %queue?)")
        handler(rest)

    def _cmd_status(self, rest: list[str]) -> None:
        tq = self._queue_for(rest[0] if rest else None)
        print(tq.url)
        for name, value in tq.status().as_dict().items():
            print(f"  {name:<10}{value:>10,}")

    def _cmd_jobs(self, rest: list[str]) -> None:
        tq = self._queue_for(rest[0] if rest else None)
        jobs = tq.jobs()
        for job in jobs:
            print(job.view.refresh_text().splitlines()[0])
        if not jobs:
            print(f"no jobs in {tq.url}")

    def _cmd_job(self, rest: list[str]) -> None:
        if not rest:
            raise UsageError("%queue job ID [URL]")
        from IPython.display import display

        display(self._queue_for(rest[1] if len(rest) > 1 else None).job(rest[0]))

    def _cmd_workers(self, rest: list[str]) -> None:
        if rest and rest[0] == "start":
            if len(rest) < 2 or not rest[1].isdigit():
                raise UsageError("%queue workers start N [URL]")
            tq = self._queue_for(rest[2] if len(rest) > 2 else None)
            n = int(rest[1])
            owned = self._server_workers_start(tq, n)
            if owned:
                print(
                    f"started {n} worker(s) owned by the Jupyter server (they outlive kernel restarts) "
                    f"on {tq.url}: pids {', '.join(map(str, owned))}"
                )
                return
            pool = tq.spawn_workers(n)
            self._workers.append(pool)
            print(f"started {len(pool.pids)} worker(s) on {tq.url}: pids {', '.join(map(str, pool.pids))}")
        elif rest and rest[0] == "stop":
            local = [proc.pid for pool in self._workers for proc in pool.procs if proc.poll() is None]
            for pool in self._workers:
                pool.stop()
            self._workers.clear()
            stopped = len(local)
            server = self._server_info()
            if server is not None:
                from .server.client import kernel_started_workers, stop_server_workers

                # Every kernel's, this one's before a restart included: they serve notebooks.
                pids = [w["pid"] for w in kernel_started_workers(server)]
                stopped += stop_server_workers(server, pids) if pids else 0
            print(f"stopped {stopped} worker(s)")
        elif rest:
            raise UsageError("%queue workers [start N [URL] | stop]")
        else:
            lines = [
                f"  pid {proc.pid}: running, started here"
                for pool in self._workers
                for proc in pool.procs
                if proc.poll() is None
            ]
            server = self._server_info()
            if server is not None:
                from .server.client import kernel_started_workers

                lines += [
                    f"  pid {w['pid']}: running, owned by the Jupyter server, on {w['url']}"
                    for w in kernel_started_workers(server)
                ]
            print("\n".join(lines) if lines else "no live workers started from this kernel or its server")

    def _server_info(self) -> dict[str, Any] | None:
        """The Jupyter server this kernel runs under, when it has the nbqueue extension."""
        if not self._server_looked_up:
            self._server_looked_up = True
            try:
                from .server.client import running_server
            except ImportError:
                return None
            self._server = running_server()
        return self._server

    def _server_workers_start(self, tq: TaskQueue, n: int) -> list[int] | None:
        """Workers owned by the Jupyter server this kernel runs under, when it has the nbqueue
        extension; None to fall back to local processes."""
        if tq.url.startswith("mem://"):
            return None
        server = self._server_info()
        if server is None:
            return None
        from .server.client import start_server_workers

        try:
            return start_server_workers(server, tq.worker_url, n)
        except NbQueueError as exc:
            print(f"nbqueue: the Jupyter server could not start workers ({exc}); starting them here")
            return None

    def _cmd_results(self, rest: list[str]) -> None:
        usage = "%queue results JOB [--out VAR] [URL]"
        outs, rest = _take_option(rest, "--out", usage)
        out = outs[-1] if outs else "_results"
        if not rest:
            raise UsageError(usage)
        job = self._queue_for(rest[1] if len(rest) > 1 else None).job(rest[0])
        values = job.results(on_error="exception", wait=False)  # never blocks the kernel
        self._ip.user_ns[out] = values
        pending = sum(v is PENDING for v in values)
        more = f" ({pending:,} not finished yet: PENDING in their place)" if pending else ""
        print(f"{len(values):,} results of job {job.name} in {out}{more}")

    def _cmd_cancel(self, rest: list[str]) -> None:
        usage = "%queue cancel JOB [--task ID ...] [URL]"
        tasks, rest = _take_option(rest, "--task", usage)
        if not rest:
            raise UsageError(usage)
        job = self._queue_for(rest[1] if len(rest) > 1 else None).job(rest[0])
        ended = job.cancel(tasks or None)
        what = f"job {job.name}" if not tasks else f"{len(tasks)} task(s) of job {job.name}"
        running = job.counts().leased
        print(f"cancelled {what}: {ended:,} waiting task(s) ended; {running:,} running one(s) are told")

    def _cmd_retry(self, rest: list[str]) -> None:
        if not rest:
            raise UsageError("%queue retry JOB [URL]")
        job = self._queue_for(rest[1] if len(rest) > 1 else None).job(rest[0])
        source, names = job.meta.get("source"), job.meta.get("parameters")
        if source is None or names is None:
            raise UsageError(f"job {job.name} was not made by %%queue: use job.retry(fn=fixed_function)")
        # Compiled now: the helpers and globals it reads are the notebook's current ones.
        n = job.retry(cell_function(source, names, self._ip.user_ns))
        print(f"queued {n:,} failed task(s) of job {job.name} again, with the notebook's current code")

    def _cmd_dlq(self, rest: list[str]) -> None:
        action = rest[0] if rest else "list"
        tq = self._queue_for(rest[1] if len(rest) > 1 else None)
        if action == "redrive":
            print(f"{tq.redrive()} dead letter(s) queued again")
        elif action == "purge":
            print(f"{tq.purge_dead()} dead letter(s) deleted")
        elif action == "list":
            from .report import dead_letter_line, dead_letters

            letters = dead_letters(tq)
            for row in letters:
                print(f"  {dead_letter_line(row)}")
            if not letters:
                print(f"no dead letters in {tq.url}")
        else:
            raise UsageError("%queue dlq [list|redrive|purge] [URL]")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbqueue``: register the magics (again, harmlessly, on a reload)."""
    ipython.register_magics(QueueMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Nothing to undo: the next load registers fresh magics over these."""
