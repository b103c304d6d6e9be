"""What may reach a backend: documented API paths only, with names Ollama itself accepts.

A path is checked as the client sent it (RAW_URI), not only as the server decoded it: a dot
segment, slash or backslash can hide behind percent-encoding, once or twice.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from flask import Flask, request
from werkzeug.exceptions import BadRequest

DECODINGS = 3  # %252e is "." after two decodings; three covers every form seen in fuzzing
ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
# sha256:<64 hex>, or sha256-<64 hex> as Ollama also names blob files.
BLOB_DIGEST = re.compile(r"sha256[:-][0-9a-f]{64}")
# [host[:port]/][namespace/]model[:tag], the parts Ollama's model names are made of.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}"
MODEL_NAME = re.compile(
    rf"(?:{_PART}(?::[0-9]{{1,5}})?/)?(?:{_PART}/)?{_PART}(?::[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})?"
)


class UnsafePath(BadRequest):
    description = "the path has dot segments, encoded separators, backslashes or NUL"


class BadBlobDigest(BadRequest):
    description = "a blob digest is sha256:<64 lowercase hex digits>"


class BadModelName(BadRequest):
    def __init__(self, name: str) -> None:
        super().__init__(f"not a model name: {name[:100]!r}")


def _forms(raw: str) -> list[str]:
    """The path as sent and each decoding of it, until decoding changes nothing."""
    forms = [raw]
    for _ in range(DECODINGS):
        decoded = unquote(forms[-1], errors="replace")
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def is_safe(raw: str) -> bool:
    """No dot segment, backslash or NUL in any decoding; no encoded separator in a segment."""
    if ENCODED_SEPARATOR.search(raw):
        return False
    for form in _forms(raw):
        if "\\" in form or "\x00" in form or ENCODED_SEPARATOR.search(form):
            return False
        if any(segment in (".", "..") for segment in form.split("/")):
            return False
    return True


def _check_path() -> None:
    environ = request.environ
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or quote(request.path)
    if not is_safe(raw.split("?", 1)[0]) or not is_safe(request.path):
        raise UnsafePath()


def check_digest(digest: str) -> str:
    if not BLOB_DIGEST.fullmatch(digest):
        raise BadBlobDigest()
    return digest


def check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise BadModelName(name)
    return name


def init_app(app: Flask) -> None:
    """Refuse unsafe paths before any view (and so any backend) sees them."""
    app.before_request(_check_path)
