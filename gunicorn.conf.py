"""gunicorn reads this file from the working directory: `gunicorn -k gevent wsgi:app`."""

import os
import sys

worker_class = "gevent"


def on_starting(server):
    """Several workers are one fair queue only through Redis: refuse them without it."""
    if server.cfg.workers > 1 and not os.environ.get("REDIS_URL"):
        server.log.error(
            "ollamamq: %d workers without REDIS_URL would be %d separate queues, each using "
            "every backend's slots; set REDIS_URL to share one queue, or run one worker",
            server.cfg.workers,
            server.cfg.workers,
        )
        sys.exit(1)
