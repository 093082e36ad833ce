"""The FastAPI app: the predecessor's routes under /api plus cancel, logs, downloads, docs and metrics.

The route code is the same for every backend; a backend is the small `jobs.Backend` interface."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import urllib3
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelmerge import __version__
from modelmerge.contract import MergeRequest, describe_validation_error, format_validation_error, methods_catalogue
from modelmerge.mergekit_yaml import parse_config_text
from modelmerge_api import outputs
from modelmerge_api.bodies import TOKEN_HEADER, json_object, pop_token
from modelmerge_api.body_docs import REF, document_body, hf_token_property
from modelmerge_api.errors import ApiError
from modelmerge_api.jobs import STATUSES, Backend, Job, Status, WouldBlock, jobs_page_json, utcnow
from modelmerge_api.middleware import BearerAuth, BodyLimit, RequestMetrics
from modelmerge_api.sweeps import document_sweep_body, sweep_routes

log = logging.getLogger("modelmerge.api")

EXAMPLE_REQUEST: dict[str, Any] = {
    "base_model": "Qwen/Qwen2.5-0.5B",
    "models_to_merge": ["InfiX-ai/Qwen-base-0.5B-code", "InfiX-ai/Qwen-base-0.5B-algebra"],
    "merge_method": "task_arithmetic",
    "scaling_coefficient": 0.3,
    "use_gpu": False,
    "param_value_mask_rate": 0.8,
    "exclude_param_names_regex": [],
}
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))
# Overall cross-entropy of evaluated merges (nats per answer token): a useful merge of instruction-tuned models is
# around 0.3-2, a broken one far above (a uniform guess over a 150k vocabulary is 11.9).
CE_BUCKETS = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, float("inf"))


@dataclass
class AppSettings:
    api_token: str | None = None
    token_review: Callable[[str], bool] | None = None
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    max_body_bytes: int = 256 * 1024


def create_app(backend: Backend, settings: AppSettings | None = None) -> FastAPI:
    settings = settings or AppSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(backend.start)
        try:
            yield
        finally:
            await run_in_threadpool(backend.stop)

    app = FastAPI(title="ModelMerge API", version=__version__, lifespan=lifespan,
                  description="Merge language models: the predecessor's REST API over a local or a "
                  "Kubernetes backend.")
    registry = CollectorRegistry()
    registry.register(JobCollector(backend))
    app.include_router(api_routes(backend))
    app.include_router(sweep_routes(backend))
    app.add_api_route("/metrics", lambda: Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST),
                      include_in_schema=False)
    _install_error_handlers(app)
    _document_request_body(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_token or settings.token_review:
        app.add_middleware(BearerAuth, token=settings.api_token, review=settings.token_review)
    app.add_middleware(RequestMetrics, registry=registry)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Location", "Content-Disposition"])
    return app


def api_routes(backend: Backend) -> APIRouter:
    router = APIRouter(prefix="/api")
    catalogue = {"methods": methods_catalogue()}
    checksums = outputs.ChecksumCache()

    @router.get("/health", summary="Liveness, version, and whether merges can run")
    def health() -> dict[str, Any]:
        info = backend.health()
        return {"status": "healthy", "timestamp": utcnow(), "merging_available": info.pop("merging_available"),
                "version": __version__, "backend": backend.name, "backend_info": info}

    @router.get("/methods", summary="Every merge method with every parameter it takes")
    def methods() -> dict[str, Any]:
        return catalogue

    @router.get("/example", summary="A valid example request for POST /api/merge")
    def example() -> dict[str, Any]:
        return EXAMPLE_REQUEST

    @router.post("/merge", status_code=202, summary="Start a merge (body: MergeRequest)")
    async def merge(request: Request) -> JSONResponse:
        data = json_object(await request.body(), what="the merge request's fields (see GET /api/example)")
        token = pop_token(data, request.headers.get(TOKEN_HEADER))
        merge_request = _validate(data)
        job_id = str(uuid.uuid4())
        output_rel = outputs.normalize_output_dir(merge_request.output_dir, default=job_id)
        job = await run_in_threadpool(backend.submit, job_id, merge_request, output_rel, token)
        check = f"/api/jobs/{job.job_id}"
        return JSONResponse({"job_id": job.job_id, "status": job.status, "message": "Merging job started",
                             "check_status": check}, status_code=202, headers={"Location": check})

    # The two hot routes read on the event loop (no thread hop, no GIL convoy of 32 threads) unless the
    # backend says it must block, and send the jobs' JSON bytes directly (no response-model pass; a job the
    # backend froze is not encoded again): the same bytes a JSONResponse of to_json() would send.
    @router.get("/jobs", summary="Jobs, newest first", response_class=JSONResponse)
    async def list_jobs(status: Status | None = None, limit: int = Query(100, ge=1, le=1000),
                        offset: int = Query(0, ge=0),
                        sweep_id: str | None = Query(None, min_length=1, max_length=253,
                                                     description="Only the trials of this sweep")) -> Response:
        jobs, total = await _read(backend.list, status, limit, offset, sweep_id=sweep_id)
        return Response(jobs_page_json(jobs, total, limit, offset), media_type=JSONResponse.media_type)

    @router.get("/jobs/{job_id}", summary="One job's status", response_class=JSONResponse)
    async def get_job(job_id: str) -> Response:
        return Response((await _read(backend.get, job_id)).json_bytes(), media_type=JSONResponse.media_type)

    @router.delete("/jobs/{job_id}", summary="Cancel a pending or running merge")
    def cancel_job(job_id: str) -> dict[str, Any]:
        job = backend.cancel(job_id)
        return {**job.to_json(), "message": "cancellation requested"}

    @router.get("/jobs/{job_id}/logs", summary="The merge log (follow=true streams it until the job ends)")
    def job_logs(job_id: str, follow: bool = False) -> StreamingResponse:
        return StreamingResponse(backend.logs(job_id, follow=follow), media_type="text/plain; charset=utf-8")

    @router.get("/download/{job_id}", summary="The finished output: path and files with sizes and sha256")
    def download(job_id: str) -> dict[str, Any]:
        job, output = _finished_output(backend, job_id)
        files = checksums.listing(output)
        return {"job_id": job_id, "output_path": job.output_path,
                "message": "Merged model ready for download", "files": files,
                "total_size": sum(f["size"] for f in files),
                "archive_url": f"/api/download/{job_id}/archive",
                "file_url_template": f"/api/download/{job_id}/files/{{path}}"}

    @router.get("/download/{job_id}/archive", summary="The output directory as a tar stream")
    def download_archive(job_id: str) -> StreamingResponse:
        job, output = _finished_output(backend, job_id)
        top = PurePosixPath(job.output_rel).name
        return StreamingResponse(outputs.tar_stream(output, top), media_type="application/x-tar",
                                 headers={"Content-Disposition": f'attachment; filename="{top}.tar"'})

    @router.get("/download/{job_id}/files/{path:path}", summary="One file of the output")
    def download_file(job_id: str, path: str) -> FileResponse:
        _, output = _finished_output(backend, job_id)
        target = outputs.safe_file(output, path)
        return FileResponse(target, filename=target.name)

    return router


async def _read(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return method(*args, **kwargs, blocking=False)
    except WouldBlock:
        return await run_in_threadpool(method, *args, **kwargs)


def _validate(data: dict[str, Any]) -> MergeRequest:
    if isinstance(data.get("mergekit_config"), str):  # the YAML text of a mergekit config
        try:
            data["mergekit_config"] = parse_config_text(data["mergekit_config"], where="mergekit_config")
        except ValueError as exc:
            reason = str(exc).removeprefix("mergekit_config: ")
            raise ApiError(400, f"invalid merge request: {exc}",
                           [{"field": "mergekit_config", "message": reason}]) from None
    try:
        return MergeRequest.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, "invalid merge request: " + format_validation_error(exc),
                       describe_validation_error(exc)) from None


def _finished_output(backend: Backend, job_id: str):
    job: Job = backend.get(job_id)
    if job.status != "completed":
        raise ApiError(400, f"job {job_id!r} is not completed (status: {job.status}); "
                       "downloads are available once it is")
    return job, outputs.job_output(backend.output_root, job.output_rel)


def _document_request_body(app: FastAPI) -> None:
    """POST /api/merge reads its body itself (to pop the token and report errors its own way); /docs still
    shows the contract's MergeRequest schema for it, plus the write-only hf_token."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        request = MergeRequest.model_json_schema(ref_template=REF)
        request["properties"]["hf_token"] = hf_token_property("the merge")
        document_body(schema, "/api/merge", "MergeRequest", request)
        document_sweep_body(schema)
        return schema

    app.openapi = openapi


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: "Endpoint not found", 405: "Method not allowed"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def query_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"field": ".".join(str(p) for p in err["loc"][1:]) or "request", "message": err["msg"]}
                   for err in exc.errors()]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return JSONResponse({"error": f"invalid request: {message}", "details": details}, status_code=400)

    @app.exception_handler(urllib3.exceptions.HTTPError)
    async def unreachable(request: Request, exc: urllib3.exceptions.HTTPError) -> JSONResponse:
        """The Kubernetes client could not reach the API server (refused, timed out, reset): a bad gateway, not
        an error of ours."""
        log.warning("Kubernetes API server unreachable on %s %s: %s", request.method, request.url.path, exc)
        reason = getattr(exc, "reason", None) or exc
        return JSONResponse({"error": f"the Kubernetes API server could not be reached: {type(reason).__name__}"},
                            status_code=502)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


class JobCollector:
    """Jobs by status and merge durations, read from the backend at scrape time (so they survive restarts)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def collect(self):
        counts, durations = self.backend.stats()
        gauge = GaugeMetricFamily("modelmerge_jobs", "Merge jobs by status", labels=["status"])
        for status in STATUSES:
            gauge.add_metric([status], counts.get(status, 0))
        yield gauge
        yield _histogram("modelmerge_merge_duration_seconds", "Wall time of completed merges", durations,
                         DURATION_BUCKETS)
        yield from _evaluation_metrics(self.backend.evaluations())


def _evaluation_metrics(evaluations: list[Any]):
    """Evaluations by state, and a histogram of the merged models' overall cross-entropy: bounded labels (a gauge
    per job would grow with every merge)."""
    states = GaugeMetricFamily("modelmerge_evaluations", "Evaluations of completed merges by state",
                               labels=["state"])
    for state in ("Succeeded", "Failed"):
        states.add_metric([state], sum(1 for e in evaluations if e.state == state))
    yield states
    scores = [e.overall.ce for e in evaluations if e.state == "Succeeded" and e.overall and e.overall.ce is not None]
    yield _histogram("modelmerge_evaluation_cross_entropy", "Overall cross-entropy of evaluated merged models "
                     "(lower is better)", scores, CE_BUCKETS)


def _histogram(name: str, documentation: str, values: list[float], bounds: tuple[float, ...]):
    buckets = [("+Inf" if bound == float("inf") else str(bound), sum(1 for v in values if v <= bound))
               for bound in bounds]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum(values))
