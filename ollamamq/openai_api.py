"""Ollama's OpenAI-compatible API: completions queued fairly, model listings relayed."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from .catalog import union
from .paths import check_model_name
from .relay import serve_direct, serve_queued
from .services import dispatcher

bp = Blueprint("openai_api", __name__, url_prefix="/v1")


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """Chat completions, streamed as server-sent events when asked."""
    return serve_queued("/v1/chat/completions")


@bp.post("/completions")
def completions() -> Response:
    """Legacy text completions."""
    return serve_queued("/v1/completions")


@bp.post("/embeddings")
def embeddings() -> Response:
    """Embeddings."""
    return serve_queued("/v1/embeddings")


@bp.get("/models")
def models() -> Response:
    """The models every backend serves, each once."""
    return jsonify(object="list", data=union(dispatcher().pool, "/v1/models"))


@bp.get("/models/<path:model>")
def model(model: str) -> Response:
    """One model (names may hold ':' and '/'), from a backend that has it."""
    return serve_direct(f"/v1/models/{check_model_name(model)}", model=model)
