"""The /api/sweeps routes: a search over merge parameters (the contract's ModelMergeSweep spec, modelmerge.sweep)
whose trials are merge jobs, on either backend.

POST /api/sweeps takes the sweep spec with a `template` of merge request fields (as POST /api/merge takes them,
`evaluation` required); the backend adds its own spec fields to the template (on Kubernetes the output volume and
the other spec defaults). Validation is the contract's, errors name the field (`space.scaling_coefficient`,
`template.evaluation`, ...) in the same error shape as /api/merge, and a refused sweep creates nothing. The trials'
outputs go into `<template.output_dir>/<trial>`, output_dir defaulting to the sweep id."""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from modelmerge.contract import MergeRequest
from modelmerge.sweep import ModelMergeSweepSpec, describe_sweep_error, format_sweep_error
from modelmerge_api import outputs
from modelmerge_api.bodies import TOKEN_HEADER, json_object, pop_token
from modelmerge_api.body_docs import REF, add_schema, document_body, hf_token_property
from modelmerge_api.errors import ApiError
from modelmerge_api.jobs import Backend
from modelmerge_api.sweep_view import SweepBackend


def sweep_backend(backend: Backend) -> SweepBackend:
    """The sweeps of a job backend: SQLite and its worker pool locally, ModelMergeSweeps on Kubernetes."""
    if backend.name == "kubernetes":
        from modelmerge_api.kube_sweeps import KubeSweeps

        return KubeSweeps(backend)
    from modelmerge_api.local_sweeps import LocalSweeps

    return LocalSweeps(backend)


def sweep_routes(backend: Backend) -> APIRouter:
    sweeps = sweep_backend(backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # entered after the backend started, left before it stops
        await run_in_threadpool(sweeps.start)
        try:
            yield
        finally:
            await run_in_threadpool(sweeps.stop)

    router = APIRouter(prefix="/api", lifespan=lifespan)

    @router.post("/sweeps", status_code=202, summary="Start a sweep (body: a ModelMergeSweep spec whose template "
                 "holds merge request fields)")
    async def create_sweep(request: Request) -> JSONResponse:
        data = json_object(await request.body(), what="the sweep's fields (template, space, strategy, ...)")
        token = pop_token(data, request.headers.get(TOKEN_HEADER))
        sweep_id = str(uuid.uuid4())
        spec = validate_sweep(data, sweep_id=sweep_id, template_defaults=sweeps.template_defaults)
        view = await run_in_threadpool(sweeps.submit, sweep_id, spec, token)
        check = f"/api/sweeps/{sweep_id}"
        return JSONResponse({"sweep_id": sweep_id, "status": view.rest_status, "message": "Sweep started",
                             "trials": view.status.counts.total or len(view.status.trials),
                             "check_status": check}, status_code=202, headers={"Location": check})

    @router.get("/sweeps", summary="Sweeps, newest first (without their trials)")
    def list_sweeps(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        views, total = sweeps.list(limit, offset)
        following = offset + len(views)
        return {"sweeps": [view.to_json(trials=False) for view in views], "total": total, "limit": limit,
                "offset": offset, "next_offset": following if following < total else None}

    @router.get("/sweeps/{sweep_id}", summary="One sweep: its trials, their scores and the best trial")
    def get_sweep(sweep_id: str) -> dict[str, Any]:
        return sweeps.get(sweep_id).to_json()

    @router.delete("/sweeps/{sweep_id}", summary="Cancel a sweep: no new trials, the running ones are cancelled")
    def cancel_sweep(sweep_id: str) -> dict[str, Any]:
        return {**sweeps.cancel(sweep_id).to_json(), "message": "cancellation requested"}

    return router


def validate_sweep(data: dict[str, Any], *, sweep_id: str, template_defaults: dict[str, Any]) -> ModelMergeSweepSpec:
    """The contract's sweep spec from a REST body: its template may name merge request fields only (the backend
    adds `template_defaults`), and its output_dir is a relative folder under the output root (default: the sweep
    id)."""
    template = data.get("template")
    if isinstance(template, dict):
        unknown = sorted(set(template) - set(MergeRequest.model_fields))
        if unknown:
            details = [{"field": f"template.{name}", "message": "unknown field (the template takes the merge "
                        "request's fields, as POST /api/merge does)"} for name in unknown]
            raise _invalid("; ".join(f"{d['field']}: {d['message']}" for d in details), details)
        try:
            output_rel = outputs.normalize_output_dir(template.get("output_dir"), default=sweep_id)
        except ApiError as exc:
            raise _invalid(f"template.{exc.message}", [{"field": "template.output_dir",
                                                         "message": d["message"]} for d in exc.details or []]) \
                from None
        data = {**data, "template": {**template_defaults, **template, "output_dir": output_rel}}
    try:
        return ModelMergeSweepSpec.model_validate(data)
    except ValidationError as exc:
        raise _invalid(format_sweep_error(exc), describe_sweep_error(exc)) from None


def _invalid(message: str, details: list[dict[str, str]]) -> ApiError:
    return ApiError(400, f"invalid sweep: {message}", details)


def document_sweep_body(schema: dict[str, Any]) -> None:
    """/docs: the OpenAPI `schema` shows the contract's sweep spec for POST /api/sweeps's body, its template being
    the merge request's fields with evaluation required, plus the write-only hf_token."""
    template = MergeRequest.model_json_schema(ref_template=REF)
    template["required"] = sorted({*template.get("required", []), "evaluation"})
    template["description"] = ("The merge request fields of every trial, as POST /api/merge takes them "
                               "(evaluation required); each trial's point of the space replaces its fields, and "
                               "output_dir (default: the sweep id) is the folder of the trials' outputs.")
    body = ModelMergeSweepSpec.model_json_schema(ref_template=REF)
    body["properties"]["template"] = {"$ref": add_schema(schema, "SweepTemplateRequest", template)}
    body["properties"]["hf_token"] = hf_token_property("the trials' merges")
    document_body(schema, "/api/sweeps", "ModelMergeSweepRequest", body)
