"""What a request body says: its model, a guess of its tokens, its output limit.

Any bytes come in; a dict or a self-rendering 400 comes out. Every field the proxy reads
is checked for its type here, so nothing further on meets a number where a list belongs.
"""

from __future__ import annotations

import json
from typing import Any

from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import BadRequest, NotFound

USAGE_PATHS = ("/v1/chat/completions", "/v1/completions")  # streams that can report usage
CHARS_PER_TOKEN = 4  # rough input estimate charged at dispatch, corrected on completion
TEXT, NUMBER = (str,), (int, float)
FIELD_TYPES: dict[str, tuple[type, ...]] = {  # what each field the proxy reads may hold
    "model": TEXT,
    "name": TEXT,
    "messages": (list,),
    "options": (dict,),
    "stream_options": (dict,),
    "prompt": (str, list),  # OpenAI completions take a list of prompts
    "system": TEXT,
    "suffix": TEXT,
    "input": (str, list),
    "stream": (bool,),
    "keep_alive": (str, *NUMBER),
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
}


class BadPayload(BadRequest):
    """A body the proxy cannot read: says what is wrong, in the path's dialect."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(f"model '{model}' not found, try pulling it first")


def loads(body: bytes | str) -> Any:
    """json.loads that raises ValueError for anything unreadable, deep nesting included."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


class SafeJSONProvider(DefaultJSONProvider):
    """Flask's JSON, with deep nesting a ValueError too: get_json() then answers 400."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def _type_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", list: "a list", dict: "an object", bool: "true or false"}
    names |= {int: "an integer", float: "a number"}
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


def check_fields(payload: dict) -> dict:
    """The payload, if every field the proxy reads has a type it may have (null: absent)."""
    for field, kinds in FIELD_TYPES.items():
        value = payload.get(field)
        if value is None:
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise BadPayload(f"{field} must be {_type_name(kinds)}")
    for message in payload.get("messages") or ():
        if not isinstance(message, dict):
            raise BadPayload("each of messages must be an object")
    if not isinstance((payload.get("stream_options") or {}).get("include_usage", False), bool):
        raise BadPayload("stream_options.include_usage must be true or false")
    return payload


def parse_request(body: bytes) -> dict:
    """The JSON object of a queued request (raises BadPayload saying what is wrong)."""
    payload = json_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadPayload("model is required")
    return payload


def json_object(body: bytes) -> dict:
    """The JSON object a model-management call sends (raises BadPayload if it is none)."""
    try:
        payload = loads(body)
    except ValueError as exc:
        raise BadPayload(f"invalid JSON body: {exc}") from None
    if not isinstance(payload, dict):
        raise BadPayload("the request body must be a JSON object")
    return check_fields(payload)


def model_named_in(payload: dict) -> str | None:
    """The `model` (or deprecated `name`) a JSON object names, if any."""
    model = payload.get("model") or payload.get("name")
    return model if isinstance(model, str) else None


def estimate_input_tokens(payload: dict) -> float:
    """Input tokens guessed from the text sent; kept low so corrections rarely go down."""
    texts = [payload.get(k) for k in ("prompt", "system", "suffix", "input")]
    texts += [m.get("content") for m in payload.get("messages") or ()]
    chars = sum(len(t) for t in texts if isinstance(t, str))
    chars += sum(len(s) for t in texts if isinstance(t, list) for s in t if isinstance(s, str))
    return chars / CHARS_PER_TOKEN


def output_limit(path: str, payload: dict) -> int | None:
    """The most output tokens the client allows (embeddings make none)."""
    if "embed" in path:
        return 0
    options = payload.get("options") or {}
    for limit in (
        options.get("num_predict"),
        payload.get("max_completion_tokens"),
        payload.get("max_tokens"),
    ):
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
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
    try:
        return json.dumps(payload).encode(), True
    except RecursionError:  # parsed at the limit, one frame deeper to write back
        raise BadPayload("JSON nested too deeply") from None
