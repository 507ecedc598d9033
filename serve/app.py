"""The Ray Serve application: an HTTP gateway (routes, limits, metrics, the web page) in front of N generator
replicas that gather concurrent requests into one pipeline call (``@serve.batch``).

Ray Serve does the distributed part (replicas, routing, restarts, bounded queues, multi-node clusters); this
module only says what a request is and how the pipeline runs it.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.pipeline import Pipeline
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .api import (
    MAX_BODY_BYTES,
    BodyTooLargeError,
    Generation,
    NoSuchRouteError,
    ServiceBusyError,
    error_body,
    error_status,
    generation_answer,
    internal_error_body,
    parse_generation,
    png_bytes,
)
from .config import ServeConfig, config_from_args
from .metrics import Metrics

APP_NAME = "edgegen"
RETRY_AFTER_S = 1
HEALTH_TIMEOUT_S = 5.0
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
REPLICA_LOST = (RayActorError,)  # a replica died or is unreachable (ActorDiedError, ActorUnavailableError)


def generate_pixels(pipe: Pipeline, prompts: list[str], seeds: list[int], options: dict) -> np.ndarray:
    """The service's one pipeline call: one prompt and one seed per image, uint8 NHWC pixels.

    Each image's noise comes from its own seed, so the image does not depend on which requests share the call.
    """
    return pipe(prompts, seed=seeds, output_type="uint8", **options)


# ---------------------------------------------------------------- generator replicas


@dataclass(slots=True)
class Job:
    """A request as a generator replica sees it, with the time it arrived there (for the queue timing)."""

    generation: Generation
    arrived: float = 0.0


class Generator:
    """One pipeline per replica. Requests with equal options and prompt length are batched into calls of at
    most the bundle's maximum batch of images; the call runs in a worker thread so the next batch fills
    meanwhile (one batch at a time: the pipeline and its tokenizer are never used by two threads at once)."""

    def __init__(self, config: ServeConfig):
        self.pipe = Pipeline.from_bundle(config.bundle, backend=config.backend, precision=config.precision)
        self.served_by = {"backend": self.pipe.backend, "precision": self.pipe.precision}
        self.run_batch.set_max_batch_size(config.max_batch)
        self.run_batch.set_batch_wait_timeout_s(config.batch_wait_ms / 1000 if config.max_batch > 1 else 0.0)

    def describe(self) -> dict:
        bundle = self.pipe.bundle
        return {
            "bundle": str(bundle.root),
            "family": bundle.family,
            "image_size": bundle.generation["image_size"],
            "max_images_per_call": self.pipe.max_batch,
            "options": list(self.pipe.options),
            "pid": os.getpid(),
            **self.served_by,
        }

    def health(self) -> bool:
        return True

    async def generate(self, generation: Generation) -> dict:
        return await self.run_batch(Job(generation, time.perf_counter()))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)  # both set per application in __init__
    async def run_batch(self, jobs: list[Job]) -> list[dict]:
        started = time.perf_counter()
        answers = await asyncio.to_thread(self._run_jobs, jobs)
        for job, answer in zip(jobs, answers):
            answer.setdefault("timings_ms", {})["queue"] = round((started - job.arrived) * 1000, 3)
        return answers

    def _run_jobs(self, jobs: list[Job]) -> list[dict]:
        keys = [(job.generation.options_key(), sequence_of(self.pipe, job.generation.prompt)) for job in jobs]
        answers: dict[int, dict] = {}
        for call in plan_calls(keys, [job.generation.n for job in jobs], self.pipe.max_batch):
            for index, answer in zip(call, self._run_call([jobs[i] for i in call])):
                answers[index] = answer
        return [answers[i] for i in range(len(jobs))]

    def _run_call(self, jobs: list[Job]) -> list[dict]:
        """One pipeline call for jobs with equal options. If it fails, each job runs alone: one bad request
        (a value only the pipeline refuses) gets its own error and never spoils the requests batched with
        it."""
        generations = [job.generation for job in jobs]
        prompts = [g.prompt for g in generations for _ in range(g.n)]
        seeds = [s for g in generations for s in g.seeds]
        try:
            t0 = time.perf_counter()
            pixels = generate_pixels(self.pipe, prompts, seeds, generations[0].options)
            generated_ms = (time.perf_counter() - t0) * 1000
        except Exception as e:  # noqa: BLE001 - answered as JSON, never a dead replica
            if len(jobs) > 1:
                return [answer for job in jobs for answer in self._run_call([job])]
            return [failure_answer(e)]
        answers, first = [], 0
        for i, g in enumerate(generations):
            t1 = time.perf_counter()
            pngs = [png_bytes(p) for p in pixels[first : first + g.n]]
            first += g.n
            timings = {
                "generate": round(generated_ms, 3),
                "encode": round((time.perf_counter() - t1) * 1000, 3),
            }
            answers.append(
                {
                    "pngs": pngs,
                    "seeds": g.seeds,
                    "timings_ms": timings,
                    "served_by": self.served_by,
                    "batch": {"images": len(prompts), "requests": len(jobs), "first": i == 0},
                }
            )
        return answers


def plan_calls(keys: list, images: list[int], max_images: int) -> list[list[int]]:
    """Job indexes grouped into pipeline calls: equal keys, at most ``max_images`` images per call."""
    calls: list[list[int]] = []
    open_call: dict = {}  # key -> (the call being filled, its image count)
    for index, (key, count) in enumerate(zip(keys, images)):
        call, filled = open_call.get(key, (None, 0))
        if call is None or filled + count > max_images:
            call, filled = [], 0
            calls.append(call)
        call.append(index)
        open_call[key] = (call, filled + count)
    return calls


def sequence_of(pipe: Pipeline, prompt: str) -> int:
    """The token positions ``prompt`` runs at in a call of its own. A call runs at its longest prompt's
    length; the padding is masked, yet it changes float rounding (a pixel by 1 now and then), so only prompts
    of one length share a call: batching then never changes an image. (Fixed-shape paths: always max_length.)
    """
    tokenizer = getattr(pipe, "tokenizer", None)
    return tokenizer.encode([prompt]).length if tokenizer is not None else 0


def failure_answer(error: Exception) -> dict:
    if isinstance(error, EdgegenError):
        return {"error": error_body(error), "status": error_status(error)}
    return {"error": internal_error_body(error), "status": 500}


# ---------------------------------------------------------------- HTTP gateway


class Gateway:
    """Every HTTP route. Checks each request before it reaches a replica, holds the metrics, and turns a full
    queue, a passed deadline or a lost replica into 503 with Retry-After."""

    def __init__(self, generator, config: ServeConfig):
        self.generator = generator
        self.config = config
        self.metrics = Metrics()
        self._model: dict | None = None  # a replica's describe(), asked once
        self.routes = {
            ("POST", "/v1/images/generations"): self.generations,
            ("GET", "/v1/health"): self.health,
            ("GET", "/v1/info"): self.info,
            ("GET", "/metrics"): self.metrics_text,
        }

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        path = request.url.path
        if request.method == "OPTIONS" and self.config.cors:
            response = Response(
                status_code=204,
                headers={
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": "Content-Type",
                    "Access-Control-Max-Age": "600",
                },
            )
        else:
            handler = self.routes.get((request.method, path))
            try:
                if handler is not None:
                    response = await handler(request)
                elif request.method == "GET" and path in STATIC_FILES:
                    response = static_file(path)
                else:
                    raise NoSuchRouteError(
                        f"{request.method} {path}",
                        "no such route",
                        "see GET /v1/info; the API is POST /v1/images/generations",
                    )
            except EdgegenError as e:
                response = error_response(e)
            except Exception as e:  # noqa: BLE001 - a bug: one line of JSON, the log has the rest
                response = JSONResponse(internal_error_body(e), status_code=500)
        if self.config.cors:
            response.headers["Access-Control-Allow-Origin"] = self.config.cors
            response.headers["Vary"] = "Origin"
        route = path if handler is not None else "other"
        self.metrics.answered(route, response.status_code, time.perf_counter() - started)
        return response

    async def generations(self, request: Request) -> Response:
        arrived = time.monotonic()
        deadline = arrived + self.config.timeout_s
        model = await self.model()
        body = await read_body(request)
        generation = parse_generation(
            body, model["max_images_per_call"], model["image_size"], model["options"]
        )
        self.metrics.queue_depth.inc()
        try:
            answer = await self.call_generator(generation, deadline)
        finally:
            self.metrics.queue_depth.dec()
        if "error" in answer:
            return JSONResponse(answer["error"], status_code=answer["status"])
        if answer["batch"]["first"]:
            self.metrics.batch(answer["batch"]["images"], answer["batch"]["requests"])
        self.metrics.images.inc(len(answer["pngs"]))
        timings = {**answer["timings_ms"], "total": round((time.monotonic() - arrived) * 1000, 3)}
        served_by = {**answer["served_by"], "batch_images": answer["batch"]["images"]}
        if generation.response_format == "png":
            return Response(
                answer["pngs"][0],
                media_type="image/png",
                headers={"X-Edgegen-Seed": str(generation.seed), "X-Edgegen-Backend": served_by["backend"]},
            )
        return JSONResponse(generation_answer(answer["pngs"], answer["seeds"], timings, served_by))

    async def call_generator(self, generation: Generation, deadline: float) -> dict:
        response = self.generator.generate.remote(generation)
        try:
            return await asyncio.wait_for(awaited(response), timeout=max(0.0, deadline - time.monotonic()))
        except BackPressureError:
            raise ServiceBusyError("service", "the queue is full", f"retry after {RETRY_AFTER_S} s") from None
        except asyncio.TimeoutError:
            response.cancel()
            raise ServiceBusyError(
                "service",
                f"no answer within the deadline of {self.config.timeout_s:g} s",
                f"retry after {RETRY_AFTER_S} s, or start more replicas",
            ) from None
        except REPLICA_LOST:
            raise ServiceBusyError(
                "service",
                "the replica serving this request was lost (it restarts by itself)",
                f"retry after {RETRY_AFTER_S} s",
            ) from None

    async def model(self) -> dict:
        if self._model is None:
            self._model = await asyncio.wait_for(awaited(self.generator.describe.remote()), HEALTH_TIMEOUT_S)
        return self._model

    async def health(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(awaited(self.generator.health.remote()), HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, BackPressureError, *REPLICA_LOST):
            return error_response(
                ServiceBusyError("service", "no generator replica answers", "retry shortly")
            )
        return JSONResponse({"ok": True})

    async def info(self, request: Request) -> Response:
        model = dict(await self.model())
        model.pop("pid", None)  # one replica's; says nothing about the service
        return JSONResponse(
            {
                **model,
                "replicas": self.config.replicas,
                "max_batch": self.config.max_batch,
                "batch_wait_ms": self.config.batch_wait_ms,
                "timeout_s": self.config.timeout_s,
                "max_body_bytes": MAX_BODY_BYTES,
            }
        )

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.text(), media_type=self.metrics.content_type)


async def awaited(response):
    return await response


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES (before reading it where Content-Length says so)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large(int(declared))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large(len(body))
    return bytes(body)


def too_large(size: int) -> BodyTooLargeError:
    return BodyTooLargeError(
        "request body", f"too large: {size} bytes or more", f"send at most {MAX_BODY_BYTES // 1024} KiB"
    )


def error_response(error: EdgegenError) -> Response:
    status = error_status(error)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(error_body(error), status_code=status, headers=headers)


def static_file(path: str) -> Response:
    name, media_type = STATIC_FILES[path]
    return Response(resources.files(__package__).joinpath("static", name).read_bytes(), media_type=media_type)


# ---------------------------------------------------------------- the application


def build_app(config: ServeConfig):
    """The bound application (gateway -> generator replicas), ready for ``serve.run``."""
    generator = (
        serve.deployment(Generator)
        .options(
            name="Generator",
            num_replicas=config.replicas,
            max_ongoing_requests=config.max_ongoing,
            max_queued_requests=config.max_queued,
            ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        )
        .bind(config)
    )
    # The gateway only awaits: cheap, so it takes no CPU share, and its limit is far above the generators'
    # (their bounded queues answer 503 first).
    gateway = serve.deployment(Gateway).options(
        name="Gateway",
        num_replicas=1,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
    )
    return gateway.bind(generator, config)


def app_builder(args: dict):
    """The application for ``serve run edgegen.serve.app:app_builder bundle=DIR replicas=2`` and for Serve
    config files (KubeRay's RayService): its arguments are ServeConfig's fields. Host and port are Serve's own
    there (``http_options``), not these."""
    return build_app(config_from_args(args))
