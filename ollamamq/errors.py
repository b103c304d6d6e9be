"""Every error leaves as JSON: Ollama's `{"error": "..."}`, or OpenAI's shape under /v1."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


def json_error(status: int, message: str, retry_after: int | None = None) -> Response:
    """An error response in the dialect of the endpoint that was called."""
    if request.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "api_error"
        body: dict = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    else:
        body = {"error": message}
    response = jsonify(body)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    log.log(
        logging.WARNING if status >= 500 else logging.INFO,
        "%s %s -> %d: %s",
        request.method,
        request.path,
        status,
        message,
    )
    return response


def _http_error(exc: HTTPException) -> Response:
    if exc.response is not None and exc.code == 429:
        return exc.response  # Flask-Limiter's own, already JSON with Retry-After
    message = exc.description or exc.name
    if exc.code == 413:
        message = f"request body too large (limit {request.max_content_length} bytes)"
    return json_error(exc.code or 500, message, getattr(exc, "retry_after", None))


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return json_error(500, f"internal error: {type(exc).__name__}")


def register(app: Flask) -> None:
    """Answer every HTTP error and unexpected exception with JSON."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
