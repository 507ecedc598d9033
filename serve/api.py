"""The HTTP API's JSON in and out, free of Ray: a request body -> a checked `Generation`, a result -> its
answer, an `EdgegenError` -> ``{"error": {kind, subject, message, note}}`` with its HTTP status."""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass, field

import numpy as np
from edgegen.runtime.diffusion import IMAGE_OPTIONS
from edgegen.runtime.errors import BadInputError, EdgegenError
from edgegen.runtime.pipeline import check_seed, expand_seeds

MAX_BODY_BYTES = 64 * 1024
RESPONSE_FORMATS = ("b64_json", "png")
# OpenAI images API fields that clients send and that mean nothing to this service; accepted and ignored.
IGNORED_FIELDS = ("model", "user", "quality", "style")
# JSON values an option may take over HTTP: arrays (noise, latents, images) are Python-API only.
OPTION_TYPES = (str, int, float, bool)


class ServiceBusyError(EdgegenError):
    """The service cannot take the request now (full queue, deadline passed, replica lost): retry later."""


class BodyTooLargeError(BadInputError):
    """A request body over MAX_BODY_BYTES."""


class NoSuchRouteError(BadInputError):
    """A path or method the service does not answer."""


@dataclass(slots=True)
class Generation:
    """One checked request: ``n`` images of ``prompt``, image i with seed ``seed + i``."""

    prompt: str
    n: int
    seed: int
    response_format: str
    options: dict = field(default_factory=dict)  # the pipeline's own keywords, by their Python names

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def options_key(self) -> str:
        """Requests with equal keys may share one pipeline call (the options apply to the whole call)."""
        return json.dumps(self.options, sort_keys=True)


def parse_generation(
    body: bytes, max_images: int, image_size: int | None = None, options: tuple[str, ...] | None = None
) -> Generation:
    """The body of POST /v1/images/generations, checked before it reaches a replica. ``options``: the
    pipeline's own keywords (None: any name, left to the pipeline to refuse)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(
            "request body", f"not valid JSON: {e}", 'send e.g. {"prompt": "a cat", "n": 1}'
        ) from None
    if not isinstance(data, dict):
        raise BadInputError(
            "request body",
            f"expected a JSON object, got {type(data).__name__}",
            'send e.g. {"prompt": "a cat", "n": 1}',
        )
    prompt = data.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInputError(
            "prompt", f"expected a non-empty string, got {prompt!r}"[:200], 'e.g. "prompt": "a cat"'
        )
    n = data.pop("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_images:
        raise BadInputError(
            "n",
            f"expected an integer from 1 to {max_images}, got {n!r}"[:200],
            f"use 1 to {max_images}; for more, send several requests",
        )
    seed = data.pop("seed", None)
    if seed is not None:
        check_seed(seed)  # one integer over HTTP
    seed = expand_seeds(seed, n)[0]  # the pipeline's rules; drawn here when absent, so the answer reports it
    response_format = data.pop("response_format", "b64_json")
    if response_format not in RESPONSE_FORMATS:
        raise BadInputError(
            "response_format",
            f"unknown value {response_format!r}"[:200],
            f"use one of {', '.join(RESPONSE_FORMATS)}",
        )
    if response_format == "png" and n != 1:
        raise BadInputError("response_format", f"png answers one image, n is {n}", "use b64_json for several")
    _check_size(data.pop("size", None), image_size)
    for name in IGNORED_FIELDS:
        data.pop(name, None)
    for name, value in data.items():  # the rest are the pipeline's options
        if options is not None and name not in options:
            raise BadInputError(
                name,
                "is not a field of this API nor an option of this model",
                f"fields: prompt, n, seed, response_format, size; options: {', '.join(options) or 'none'}",
            )
        if name in IMAGE_OPTIONS:
            raise BadInputError(
                name,
                "image inputs are not taken over HTTP (a string would name a file on the server)",
                "use the Python API or edgegen generate for image-to-image, ControlNet and IP-Adapter calls",
            )
        if value is not None and not isinstance(value, OPTION_TYPES):
            raise BadInputError(
                name,
                f"takes a {type(value).__name__} here",
                "over HTTP an option is a string, "
                "number or boolean; arrays (noise, latents, images) need the Python API",
            )
    return Generation(prompt, n, seed, response_format, {k: v for k, v in data.items() if v is not None})


def _check_size(size, image_size: int | None) -> None:
    """``size`` ("WxH") may be given, but a bundle makes one size: it must be that one."""
    if size is None or image_size is None:
        return
    if size != f"{image_size}x{image_size}":
        raise BadInputError(
            "size",
            f"this model makes {image_size}x{image_size} images, not {size!r}"[:200],
            f'leave size out or send "{image_size}x{image_size}"',
        )


def png_bytes(pixels: np.ndarray) -> bytes:
    """One HWC uint8 image as PNG (lossless: the decoded pixels are the pipeline's)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)  # fast; PNG is lossless at any level
    return buf.getvalue()


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def generation_answer(pngs: list[bytes], seeds: list[int], timings_ms: dict, served_by: dict) -> dict:
    """The OpenAI images answer, plus each image's seed, the timings and what ran it."""
    return {
        "created": int(time.time()),
        "data": [
            {"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed}
            for png, seed in zip(pngs, seeds)
        ],
        "timings_ms": timings_ms,
        **served_by,
    }


# most specific first; any other EdgegenError is a bundle or backend fault on the server side: 500
STATUS_OF_ERROR = (
    (ServiceBusyError, 503),
    (BodyTooLargeError, 413),
    (NoSuchRouteError, 404),
    (BadInputError, 400),
)


def error_status(error: EdgegenError) -> int:
    return next((status for kind, status in STATUS_OF_ERROR if isinstance(error, kind)), 500)


def error_body(error: EdgegenError) -> dict:
    return {
        "error": {
            "kind": type(error).__name__,
            "subject": error.subject,
            "message": str(error),
            "note": error.note,
        }
    }


def internal_error_body(error: BaseException) -> dict:
    """A bug or an unexpected failure: one line, no traceback (the replica's log has it)."""
    return {
        "error": {
            "kind": "InternalError",
            "subject": "service",
            "message": f"service | internal error: {type(error).__name__}: {error}"[:500],
            "note": "the server's log has the traceback; report it",
        }
    }
