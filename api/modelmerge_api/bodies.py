"""Reading the JSON bodies of POST /api/merge and POST /api/sweeps: a JSON object, and the HF token that is
popped from it (or taken from the X-HF-Token header) so that it goes no further than the backend."""

from __future__ import annotations

import json
from typing import Any

from modelmerge_api.errors import ApiError

TOKEN_HEADER = "x-hf-token"
MAX_TOKEN_LENGTH = 1024


def json_object(body: bytes, *, what: str) -> dict[str, Any]:
    """The body as a JSON object; `what` says what its fields are, e.g. "the merge request's fields (see GET
    /api/example)"."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object with {what}")
    return data


def pop_token(data: dict[str, Any], header: str | None) -> str | None:
    """The HF token from the body's `hf_token` or the X-HF-Token header; it goes no further than the backend."""
    token = data.pop("hf_token", None) or header
    if token is not None and (not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH):
        raise ApiError(400, f"hf_token: must be a string of 1 to {MAX_TOKEN_LENGTH} characters",
                       [{"field": "hf_token", "message": "invalid token"}])
    return token
