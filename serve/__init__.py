"""edgegen serve: the runtime as an HTTP service with a live web page, on Ray Serve (extra ``serve``).

    from edgegen.serve import ServeConfig, start
    url = start(ServeConfig(bundle="bundles/emoji64", replicas=2))   # ready: GET {url}/v1/health is 200

The lean runtime never imports this package (nor ray); the CLI's ``serve`` command does, lazily.
"""

from .app import APP_NAME, build_app, generate_pixels
from .config import ServeConfig
from .runner import serve_forever, start, stop

__all__ = ["APP_NAME", "ServeConfig", "build_app", "generate_pixels", "serve_forever", "start", "stop"]
