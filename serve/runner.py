"""Starting and stopping the application: a local Ray cluster by itself, or the one at ``address``."""

from __future__ import annotations

import time

import ray
from ray import serve

from .app import APP_NAME, build_app
from .config import ServeConfig


def start(config: ServeConfig, address: str | None = None) -> str:
    """Deploy the application and return its URL once every replica is up (GET /v1/health answers 200)."""
    if not ray.is_initialized():
        # address None: a local single-node cluster; "auto" or "HOST:6379": join a running one
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://{config.host}:{config.port}"


def stop() -> None:
    """Delete the application and shut Serve down (the cluster too where this process started it)."""
    serve.shutdown()
    ray.shutdown()


def serve_forever(config: ServeConfig, address: str | None = None) -> None:
    url = start(config, address)
    print(
        f"edgegen serve: {url}/ (API: POST {url}/v1/images/generations; ready: GET {url}/v1/health)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
