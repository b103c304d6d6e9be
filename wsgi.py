"""For `gunicorn -k gevent wsgi:app`: one worker, or `-w N` with REDIS_URL set.

Without REDIS_URL the queues live in the worker's memory, so N workers would be N separate
queues, each granting every backend's slots: gunicorn.conf.py refuses to start them. With
it, every worker is a replica of one fair queue (cluster.py).
"""

import signal

from ollamamq import create_app, start_services  # patches gevent first
from ollamamq.cli import setup_logging
from ollamamq.shutdown import Drain

app = create_app()
config = app.config
replica = app.extensions["ollamamq"].replica
setup_logging(config["LOG_LEVEL"], config["LOG_FILE"], config["LOG_FORMAT"], replica)
start_services(app)


def _drain_then(previous):
    """Begin our drain, then let gunicorn's own handler stop the worker gracefully.

    gunicorn closes the listener and waits up to --graceful-timeout for the handlers in
    flight (set it above DRAIN_TIMEOUT); the drain answers the waiting ones 503 meanwhile.
    The worker installs its handlers before it imports this module (without --preload).
    """

    def handler(signum, frame):
        drain.on_signal()
        if callable(previous):
            previous(signum, frame)

    return handler


drain = Drain(app, finish=lambda: None)  # gunicorn stops the server itself
signal.signal(signal.SIGTERM, _drain_then(signal.getsignal(signal.SIGTERM)))
