"""Kubernetes API server errors as the REST API reports them."""

from __future__ import annotations

import json

from kubernetes.client.exceptions import ApiException

from modelmerge_api.errors import ApiError, Conflict


def api_error(exc: ApiException, what: str) -> ApiError:
    """Validation (422) → 400 with the causes as details, conflicts → 409, refusals → 403, others → 502."""
    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        body = {}
    message = body.get("message") or exc.reason or str(exc.status)
    if exc.status == 422:
        causes = (body.get("details") or {}).get("causes") or []
        details = [{"field": c.get("field", "spec").removeprefix("spec."), "message": c.get("message", "")}
                   for c in causes]
        return ApiError(400, f"{what} rejected by the Kubernetes API server: {message}", details or None)
    if exc.status == 409:
        return Conflict(f"{what}: {message}")
    if exc.status == 403:
        return ApiError(403, f"{what} forbidden by the Kubernetes API server: {message}")
    return ApiError(502, f"{what} failed: Kubernetes API error {exc.status}: {message}")
