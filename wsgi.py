"""For `gunicorn -k gevent -w 1 wsgi:app`: one worker, because the queues live in its memory."""

from ollamamq import create_app, start_services  # patches gevent first
from ollamamq.cli import setup_logging

app = create_app()
setup_logging(app.config["LOG_LEVEL"], app.config["LOG_FILE"])
start_services(app)
