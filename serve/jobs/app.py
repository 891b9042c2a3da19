"""The prune-job HTTP API: submit (validated exactly as the CLI validates), list, get, watch (SSE), cancel."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse

from llmprune.errors import LLMPruneError
from llmprune.run import make_settings  # imported at start-up (torch...), so that a first submit is quick
from llmprune_serve.auth import APIKeyMiddleware
from llmprune_serve.errors import APIError
from llmprune_serve.jobs.dashboard import dashboard_page
from llmprune_serve.jobs.runner import Runner
from llmprune_serve.jobs.store import STATUSES, TERMINAL, JobStore

TICK_SECONDS = 0.25
# run-local flags a job may not set: the service owns its output's life cycle and its worker's manners
SERVICE_OWNED = ("resume", "overwrite", "quiet", "plan_only", "plan_ranks", "command")


def bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def validate(body: object, allow_remote_code: bool = False) -> dict:
    """The job's settings, checked by the same code as `llmprune MODEL ...` (a 400 with its message). A job may
    run a model's own code (`trust_remote_code`) only on a service started with --allow-remote-code."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise APIError(400, "the body must be a JSON object with a `model` (and the Python API's settings)", "model")
    owned = [k for k in SERVICE_OWNED if k in body]
    if owned:
        raise APIError(400, f"{owned[0]} is set by the service, not by a job", owned[0])
    if body.get("trust_remote_code") and not allow_remote_code:
        message = "trust_remote_code runs the model's own code on the service's machine: start the service with "
        raise APIError(400, message + "--allow-remote-code to accept such jobs", "trust_remote_code")
    options = {k: v for k, v in body.items() if k != "model"}
    try:
        make_settings(body["model"], **options)
    except LLMPruneError as exc:
        raise APIError(400, str(exc)) from exc
    return dict(body)


def public(job: dict) -> dict:
    keys = ("id", "status", "progress", "created", "started", "finished", "error", "runs", "settings", "report")
    return {k: job[k] for k in keys}


def create_service_app(
    store: JobStore,
    runner: Runner,
    keys: tuple[str, ...],
    read_only: tuple[str, ...],
    max_queued: int,
    allow_remote_code: bool = False,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.recover()

        async def loop() -> None:
            while True:
                runner.tick()
                await asyncio.sleep(TICK_SECONDS)

        ticker = asyncio.create_task(loop())
        yield
        ticker.cancel()
        runner.stop()

    app = FastAPI(title="llmprune service", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    def writable(request: Request) -> str | None:
        key = bearer(request)
        if key is not None and key in read_only:
            raise APIError(403, "this API key is read-only", code="read_only")
        return key

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(dashboard_page())

    @app.post("/v1/prune-jobs", status_code=202)
    async def submit(request: Request) -> JSONResponse:
        key = writable(request)
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise APIError(400, "request body is not valid JSON") from exc
        settings = validate(body, allow_remote_code)
        idempotency = request.headers.get("idempotency-key")
        if (idempotency is None or store.get_by_idempotency(key, idempotency) is None) and store.queued_for(
            key
        ) >= max_queued:
            raise APIError(429, f"at most {max_queued} queued jobs per key", headers={"Retry-After": "30"})
        job, new = store.submit(settings, key, idempotency)
        if "output" not in settings:  # each job writes under the service's workdir unless told otherwise
            store.set_output(job["id"], str(runner.jobdir(job["id"]) / "output"))
            job = store.get(job["id"])
        runner.tick()
        return JSONResponse({"id": job["id"], "status": job["status"]}, status_code=202 if new else 200)

    @app.get("/v1/prune-jobs")
    async def jobs(status: str | None = None) -> dict:
        if status is not None and status not in STATUSES:
            raise APIError(400, f"status must be one of {', '.join(STATUSES)}", "status")
        return {"object": "list", "data": [public(job) for job in store.list(status)]}

    def found(job_id: str) -> dict:
        job = store.get(job_id)
        if job is None:
            raise APIError(404, f"no job {job_id!r}")
        return job

    @app.get("/v1/prune-jobs/{job_id}")
    async def job(job_id: str) -> dict:
        return public(found(job_id))

    @app.get("/v1/prune-jobs/{job_id}/events")
    async def events(job_id: str) -> StreamingResponse:
        found(job_id)

        async def stream():
            last = None
            while True:
                job = store.get(job_id)
                state = (job["status"], job["progress"])
                if state != last:
                    last = state
                    body = {"id": job_id, "status": job["status"], "progress": job["progress"], "error": job["error"]}
                    yield f"event: progress\ndata: {json.dumps(body)}\n\n"
                if job["status"] in TERMINAL:
                    yield f"event: end\ndata: {json.dumps(public(job))}\n\n"
                    return
                await asyncio.sleep(TICK_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.delete("/v1/prune-jobs/{job_id}")
    async def cancel(job_id: str, request: Request) -> dict:
        writable(request)
        job = found(job_id)
        if job["status"] == "queued":
            store.finish(job_id, "cancelled", "cancelled before it started")
        elif job["status"] == "running":
            runner.cancel(job_id)
        return {"id": job_id, "status": store.get(job_id)["status"], "cancel_requested": job["status"] == "running"}

    app.add_middleware(APIKeyMiddleware, keys=(*keys, *read_only))
    return app
