"""What a request body says: its model, a guess of its tokens, its output limit."""

from __future__ import annotations

import json

from flask import Response

from .errors import json_error

USAGE_PATHS = ("/v1/chat/completions", "/v1/completions")  # streams that can report usage
CHARS_PER_TOKEN = 4  # rough input estimate charged at dispatch, corrected on completion


def model_named(body: bytes) -> str | None:
    """The `model` (or deprecated `name`) of a small JSON body, if it names one."""
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        return None
    model = payload.get("model") or payload.get("name") if isinstance(payload, dict) else None
    return model if isinstance(model, str) else None


def parse_request(body: bytes) -> tuple[dict | None, Response | None]:
    """The JSON object of a queued request, or the 400 that says what is wrong with it."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        return None, json_error(400, f"invalid JSON body: {exc}")
    if not isinstance(payload, dict):
        return None, json_error(400, "the request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        return None, json_error(400, "model is required")
    return payload, None


def estimate_input_tokens(payload: dict) -> float:
    """Input tokens guessed from the text sent; kept low so corrections rarely go down."""
    texts = [payload.get(k) for k in ("prompt", "system", "suffix", "input")]
    texts += [m.get("content") for m in payload.get("messages") or () if isinstance(m, dict)]
    chars = sum(len(t) for t in texts if isinstance(t, str))
    chars += sum(len(s) for t in texts if isinstance(t, list) for s in t if isinstance(s, str))
    return chars / CHARS_PER_TOKEN


def output_limit(path: str, payload: dict) -> int | None:
    """The most output tokens the client allows (embeddings make none)."""
    if "embed" in path:
        return 0
    options = payload.get("options") if isinstance(payload.get("options"), dict) else {}
    for limit in (
        options.get("num_predict"),
        payload.get("max_completion_tokens"),
        payload.get("max_tokens"),
    ):
        if isinstance(limit, int) and limit >= 0:
            return limit
    return None


def ask_for_usage(path: str, payload: dict, body: bytes) -> tuple[bytes, bool]:
    """Make a streamed OpenAI call report its token usage; True if the client did not ask."""
    if path not in USAGE_PATHS or not payload.get("stream"):
        return body, False
    options = payload.get("stream_options") or {}
    if options.get("include_usage"):
        return body, False
    payload["stream_options"] = {**options, "include_usage": True}
    return json.dumps(payload).encode(), True
