"""The ``NbQueue`` ExtensionApp: settings, handlers and the server-owned workers' lifetime.

Imported only by a Jupyter server (``nbqueue._jupyter_server_extension_points``), so the rest of
``nbqueue.server`` (the kernel's client) imports without jupyter_server.
"""

from __future__ import annotations

import os

from jupyter_server.extension.application import ExtensionApp
from traitlets import Int, List, Unicode

from .. import defaults
from .handlers import HANDLERS
from .registry import QueueRegistry


class NbQueue(ExtensionApp):
    """nbqueue inside a Jupyter server."""

    name = "nbqueue"
    load_other_extensions = True

    queues = List(
        Unicode(),
        help="Queue URLs to show on the dashboard (also $NBQUEUE_URL, and any queue given workers).",
    ).tag(config=True)
    max_local_workers = Int(8, help="Most worker processes the server runs at once, over all queues.").tag(
        config=True
    )
    worker_idle_exit = Int(0, help="Seconds after which an idle server-owned worker exits (0: never).").tag(
        config=True
    )

    def initialize_settings(self) -> None:
        urls = list(self.queues)
        env_url = os.environ.get(defaults.ENV_URL)
        if env_url and env_url not in urls:
            urls.append(env_url)
        self.registry = QueueRegistry(urls, self.max_local_workers, self.worker_idle_exit or None, self.log)
        self.settings["nbqueue_registry"] = self.registry

    def initialize_handlers(self) -> None:
        self.handlers.extend(HANDLERS)

    async def stop_extension(self) -> None:
        """Stop the server's workers (each finishes its running task) when the server stops."""
        self.registry.stop_all()
