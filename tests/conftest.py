"""Shared fixtures: backends for the contract suite, and test hygiene."""

from __future__ import annotations

import os
import uuid

import pytest

from nbqueue.backends import open_backend
from nbqueue.backends.memory import MemoryBackend

from .helpers import soak_enabled
from .redis_server import RedisServer

# Tests sign with a fixed key so child processes (workers) agree without a key file.
os.environ.setdefault("NBQUEUE_SECRET", "nbqueue-test-secret")

# A real jupyter-server for the extension's tests (jp_fetch, jp_serverapp, jp_server_config).
pytest_plugins = ["pytest_jupyter.jupyter_server"]

BACKEND_KINDS = ["mem", "fq", "redis"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One private redis-server for the whole session (fails, never skips, without one)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """A redis:// URL of a fresh queue on the private server."""
    return redis_server.url(uuid.uuid4().hex)


@pytest.fixture(params=BACKEND_KINDS)
def backend_url(request, tmp_path):
    """A URL of a fresh, empty queue of each backend kind."""
    kind = request.param
    if kind == "mem":
        return f"mem://{uuid.uuid4().hex}"
    if kind == "fq":
        return f"fq://{tmp_path / 'queue'}"
    return request.getfixturevalue(f"{kind}_url")


@pytest.fixture
def backend_factory(backend_url):
    """Opens another handle on the same queue, as another process would."""
    opened = []

    def factory():
        if backend_url.startswith("mem://"):
            return opened[0]
        b = open_backend(backend_url)
        opened.append(b)
        return b

    if backend_url.startswith("mem://"):
        opened.append(MemoryBackend(backend_url[6:]))
    yield factory
    for b in opened:
        b.close()


@pytest.fixture
def backend(backend_factory):
    """A fresh empty backend of each kind."""
    return backend_factory()


@pytest.fixture(params=["fq", "redis"])
def worker_url(request, tmp_path):
    """A fresh queue that separate worker processes can share (not mem://)."""
    if request.param == "fq":
        return f"fq://{tmp_path / 'queue'}"
    return request.getfixturevalue("redis_url")


# -- soak runs ----------------------------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run fault tests at full size (also: NBQUEUE_SOAK=1); see helpers.soak_size",
    )


def pytest_collection_modifyitems(config, items):
    """Under --soak a test marked ``soak_timeout(seconds)`` gets that per-test timeout instead of
    the default (``timeout`` in pyproject.toml)."""
    if not soak_enabled(config):
        return
    for item in items:
        marker = item.get_closest_marker("soak_timeout")
        if marker is not None:
            item.add_marker(pytest.mark.timeout(*marker.args, **marker.kwargs), append=False)
