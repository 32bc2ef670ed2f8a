"""nbqueue: fan notebook functions and cells out to worker processes and machines.

``import nbqueue`` stays light: no Jupyter, ipywidgets, redis or gevent is imported here.
"""

from __future__ import annotations

from .backends.base import Counts, DeadLetter, TaskStatus
from .errors import (
    BackendUnavailable,
    BadSignature,
    BindError,
    Cancelled,
    DecodeError,
    NbQueueError,
    NotLeasedHere,
    NotQueueableError,
    QueueEmptyError,
    QueueIdentityChanged,
    QueueStateLost,
    QueueURLError,
    SerializationError,
    SigningKeyError,
    SliceContractError,
    SpecError,
    StorageFull,
    TaskFailed,
    TaskRefused,
    TaskTimeout,
    Terminal,
    TransferRefused,
    UnsafeQueueError,
)
from .handles import TaskHandle, queueable, use
from .jobs import PENDING, Job
from .pickling import Shipment, explain
from .queue import LocalTaskQueue, TaskQueue, on_first_use
from .records import TaskError
from .reference import TaskSpec
from .server.client import announce_queue
from .tasks import FunctionTask, RegisteredTask, TaskContext, current_task

__version__ = "0.1.0"

# In a kernel a Jupyter server started, the server's dashboard lists the queues the kernel uses
# (the server.client module is the standard library only: no Jupyter code is imported here).
on_first_use(announce_queue)

__all__ = [
    "BackendUnavailable",
    "DecodeError",
    "SigningKeyError",
    "SliceContractError",
    "BadSignature",
    "BindError",
    "Cancelled",
    "Counts",
    "DeadLetter",
    "FunctionTask",
    "Job",
    "PENDING",
    "LocalTaskQueue",
    "NbQueueError",
    "NotLeasedHere",
    "NotQueueableError",
    "QueueEmptyError",
    "QueueIdentityChanged",
    "QueueStateLost",
    "QueueURLError",
    "RegisteredTask",
    "SerializationError",
    "SpecError",
    "Shipment",
    "StorageFull",
    "TaskError",
    "TaskFailed",
    "TaskHandle",
    "TaskQueue",
    "TaskRefused",
    "TaskTimeout",
    "TaskSpec",
    "TransferRefused",
    "TaskContext",
    "TaskStatus",
    "Terminal",
    "UnsafeQueueError",
    "current_task",
    "explain",
    "queueable",
    "use",
]


def load_ipython_extension(ipython) -> None:  # noqa: ANN001 - IPython's shell
    """``%load_ext nbqueue``: the ``%%queue`` and ``%queue`` magics (IPython is imported only here)."""
    from .magics import load_ipython_extension as load

    load(ipython)


def _jupyter_server_extension_points() -> list[dict]:
    """The jupyter-server extension (jupyter_server is imported only when the server asks)."""
    from .server.app import NbQueue

    return [{"module": "nbqueue.server.app", "app": NbQueue}]
