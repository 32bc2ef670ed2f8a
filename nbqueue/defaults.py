"""Every tunable default of nbqueue, in one place."""

from __future__ import annotations

import os
import random

#: Seconds a worker holds a task before another worker may take it.
LEASE_SECONDS = 60.0
#: Attempts before a failing task goes to the dead letters.
MAX_ATTEMPTS = 3
#: First retry delay; doubles per attempt up to RETRY_MAX_SECONDS.
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


def retry_delay(attempt: int) -> float:
    """Exponential backoff with jitter before attempt ``attempt + 1``."""
    base = min(RETRY_BASE_SECONDS * 2 ** (attempt - 1), RETRY_MAX_SECONDS)
    return base * random.uniform(0.5, 1.0)


#: Tasks encoded and written per storage call when inserting.
INSERT_BATCH_SIZE = 500
#: Upper bound on the bytes of one insert batch (a segment file on fq://).
INSERT_BATCH_BYTES = 4 * 1024 * 1024
#: Largest number of tasks a worker leases at once (it adapts below this).
LEASE_BATCH_MAX = 64
#: A worker aims to hold about this many seconds of work per lease batch.
LEASE_BATCH_TARGET_SECONDS = 0.5
#: Idle worker backoff: starts here, doubles with jitter, stops at the max.
IDLE_SLEEP_MIN = 0.01
IDLE_SLEEP_MAX = 0.2  # bounds how long an idle fq:// worker takes to notice new work
#: How long a worker blocks on a backend that can notify (redis) per call.
BLOCK_SECONDS = 1.0
#: How often a worker (and its lease keeper) asks the storage whether a task it holds was cancelled.
CANCEL_CHECK_SECONDS = 0.5
#: How long a cancelled (or timed-out) task has to return after being told, before the lease
#: keeper kills its worker process (it may be stuck in C code, deaf to Python exceptions).
CANCEL_GRACE_SECONDS = 10.0
#: A worker whose tasks report progress (``current_task().progress``) sends it with a heartbeat
#: at most this often: the storage sees one write per worker per interval, however often tasks call.
PROGRESS_BEAT_SECONDS = 1.0
#: Characters of a task's printed output kept with its record: the last ones, as a terminal's scrollback.
OUTPUT_LIMIT = 64 * 1024
#: Results and job records on redis:// expire after this many seconds.
RESULT_TTL_SECONDS = 7 * 24 * 3600
#: Job.wait() poll interval bounds.
WAIT_POLL_MIN = 0.02
WAIT_POLL_MAX = 0.5
#: Job.wait rides out a storage outage this long (a Redis restart) before raising BackendUnavailable.
WAIT_OUTAGE_SECONDS = 120.0
#: Job.wait checks at most this often that the queue still holds its state (``Backend.queue_id``).
WAIT_IDENTITY_CHECK_SECONDS = 1.0
#: Progress views: how often a widget redraws (≤ 4 Hz) and how often it reads the newest error.
REFRESH_SECONDS = 0.25
ERROR_REFRESH_SECONDS = 1.0
#: Environment variables.
ENV_SECRET = "NBQUEUE_SECRET"
ENV_URL = "NBQUEUE_URL"
ENV_KEY_FILE = "NBQUEUE_KEY_FILE"
#: widget | text | off: overrides the detected progress display.
ENV_PROGRESS = "NBQUEUE_PROGRESS"
#: Set (to anything) to make fq:// poll instead of trusting file system notifications (inotify):
#: for a queue directory on a shared mount that nbqueue does not recognise as shared.
ENV_FQ_POLL = "NBQUEUE_FQ_POLL"
#: Set (to anything) to keep the full dill traceback behind a SerializationError.
ENV_DEBUG = "NBQUEUE_DEBUG"
#: Comma-separated top-level packages every worker has installed although they live outside
#: site-packages (an editable checkout): their code travels by reference, not by value.
ENV_BY_REFERENCE = "NBQUEUE_BY_REFERENCE"


def key_file_path() -> str:
    """Where the per-user signing key lives unless NBQUEUE_SECRET is set."""
    explicit = os.environ.get(ENV_KEY_FILE)
    if explicit:
        return explicit
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "nbqueue", "secret.key")


#: Retry backoff while the storage is unreachable or full (workers, lease keepers): first wait
#: and cap, in seconds.
RECONNECT_FIRST, RECONNECT_MAX = 0.1, 5.0
