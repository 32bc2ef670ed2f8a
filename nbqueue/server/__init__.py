"""The jupyter-server extension: a REST API, a dashboard page, and server-owned local workers.

Enabled automatically by ``jupyter-config/jupyter_server_config.d/nbqueue.json`` (installed
with the package). Configure with traitlets, e.g. in ``jupyter_server_config.py``::

    c.NbQueue.queues = ["fq:///data/queues/scores", "redis://localhost:6379/0?queue=scores"]
    c.NbQueue.max_local_workers = 8

Every route sits behind Jupyter's own authentication and authorization (resource ``nbqueue``).
No route takes or returns pickled bytes, and URLs are shown with passwords redacted.
"""

# The ExtensionApp is in nbqueue.server.app: importing this package imports no Jupyter code.
