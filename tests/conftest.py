"""Shared fixtures: backends for the contract suite, and test hygiene."""

from __future__ import annotations

import os
import uuid

import pytest

from nbqueue.backends import open_backend
from nbqueue.backends.memory import MemoryBackend

# Tests sign with a fixed key so child processes (workers) agree without a key file.
os.environ.setdefault("NBQUEUE_SECRET", "nbqueue-test-secret")

BACKEND_KINDS = ["mem", "fq"]


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
