"""ollamamq: a fair-queueing proxy in front of Ollama servers."""

from gevent import monkey

monkey.patch_all()  # first, before anything opens a socket (as Locust does)

import queue  # noqa: E402

import urllib3  # noqa: E402

# urllib3's pool must hand out the most recently used connection under gevent (locust #2813).
urllib3.connectionpool.ConnectionPool.QueueCls = queue.LifoQueue

from .app import create_app, start_services  # noqa: E402

__version__ = "0.1.0"
__all__ = ["create_app", "start_services", "__version__"]
