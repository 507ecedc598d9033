"""edgegen serve on Ray Serve: the API contract, pixels equal to the in-process Pipeline's, batching, limits
and bad requests, two replicas with one killed under load, and the live page in a headless Chromium.

Loopback only (127.0.0.1); the module starts its own Ray cluster and shuts it down; every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve")

from edgegen.runtime.pipeline import Pipeline
from edgegen.serve import APP_NAME, ServeConfig, build_app
from edgegen.serve.api import MAX_BODY_BYTES, png_pixels

HTTP_TIMEOUT_S = 60  # no single HTTP exchange in these tests may take longer


# ---------------------------------------------------------------- HTTP on loopback


def request(
    url: str,
    body: bytes | None = None,
    method: str | None = None,
    timeout: float = HTTP_TIMEOUT_S,
    headers: dict | None = None,
) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one exchange; 4xx/5xx are answers here, not exceptions."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post(url: str, payload, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, dict, dict | bytes]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, headers, data = request(
        url + "/v1/images/generations", body, "POST", timeout, {"Content-Type": "application/json"}
    )
    return (
        status,
        headers,
        (json.loads(data) if headers.get("content-type", "").startswith("application/json") else data),
    )


def images_of(answer: dict) -> np.ndarray:
    return np.stack([png_pixels(base64.b64decode(item["b64_json"])) for item in answer["data"]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- without a cluster


def test_parse_generation_defaults_seed_and_options():
    from edgegen.serve.api import parse_generation

    g = parse_generation(
        b'{"prompt": "a cat", "n": 3, "guidance_scale": 0.0, "model": "x", "size": "64x64"}', 16, 64
    )
    assert (g.prompt, g.n, g.response_format, g.options) == ("a cat", 3, "b64_json", {"guidance_scale": 0.0})
    assert (
        g.seeds == [g.seed, g.seed + 1, g.seed + 2] and 0 <= g.seed < 2**64 - 3
    )  # chosen, so it is reported
    assert parse_generation(b'{"prompt": "a cat", "seed": 7}', 16).seed == 7


def test_image_options_are_refused_over_http():
    """The pipeline reads a string image input as a path: over HTTP it would be one on the server."""
    from edgegen.runtime.errors import BadInputError
    from edgegen.serve.api import parse_generation

    for name in ("image", "control_image", "ip_adapter_image"):
        with pytest.raises(BadInputError, match="not taken over HTTP"):
            parse_generation(json.dumps({"prompt": "a cat", name: "/etc/hostname"}).encode(), 16)
    from edgegen.runtime.diffusion import IMAGE_OPTIONS, DiffusionPipeline

    assert set(IMAGE_OPTIONS) <= set(DiffusionPipeline.options)  # the declaration names the pipeline's own


def test_serve_run_arguments_become_a_config():
    from edgegen.runtime.errors import BadInputError
    from edgegen.serve.config import config_from_args

    config = config_from_args({"bundle": "/b", "replicas": "2", "batch_wait_ms": "2.5", "max_batch": 4})
    assert (config.replicas, config.batch_wait_ms, config.max_batch) == (2, 2.5, 4)
    with pytest.raises(BadInputError, match="unknown: replica"):
        config_from_args({"bundle": "/b", "replica": "2"})
    with pytest.raises(BadInputError, match="replicas"):
        config_from_args({"bundle": "/b", "replicas": "two"})


def test_plan_calls_groups_equal_keys_up_to_the_image_limit():
    from edgegen.serve.app import plan_calls

    keys = ["a", "b", "a", "a", "b", "a"]
    assert plan_calls(keys, [1, 1, 2, 1, 1, 4], 4) == [[0, 2, 3], [1, 4], [5]]
    assert plan_calls(["a"] * 3, [4, 4, 4], 4) == [[0], [1], [2]]


def test_prompts_batch_only_with_prompts_of_their_length(bert_pipe):
    """A call runs at its longest prompt's length; padding changes float rounding, so the planner's key holds
    the length each prompt runs at alone."""
    from edgegen.serve.app import sequence_of

    short, long = "a cat", "a cat with stripes with stripes with stripes"
    assert sequence_of(bert_pipe, short) < sequence_of(bert_pipe, long)
    assert sequence_of(bert_pipe, short) == sequence_of(bert_pipe, "a dog")


# ---------------------------------------------------------------- the cluster and the deployed app


@pytest.fixture(scope="module")
def cluster():
    """A private local Ray cluster with Serve's HTTP proxy on a free loopback port; shut down at the end."""
    import ray
    from ray import serve

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 2**20,
        configure_logging=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployed: dict = {}
    try:
        yield {"port": port, "deployed": deployed}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def deploy(cluster):
    """deploy(**config) -> URL. The same config is deployed once; another one replaces it."""
    from ray import serve

    def deploy_config(**options) -> str:
        config = ServeConfig(host="127.0.0.1", port=cluster["port"], **options)
        if cluster["deployed"].get("config") != config:
            serve.run(build_app(config), name=APP_NAME, route_prefix="/")
            cluster["deployed"]["config"] = config
        url = f"http://127.0.0.1:{cluster['port']}"
        wait_healthy(url, 60)
        return url

    return deploy_config


def wait_healthy(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if request(url + "/v1/health", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url}/v1/health not 200 within {seconds} s")


@pytest.fixture(scope="module")
def bert_url(deploy, bert_bundle) -> str:
    return deploy(bundle=str(bert_bundle), max_batch=8, batch_wait_ms=20)


@pytest.fixture(scope="module")
def bert_pipe(bert_bundle) -> Pipeline:
    return Pipeline.from_bundle(bert_bundle)


def in_process(pipe: Pipeline, prompt: str, seed: int, n: int = 1) -> np.ndarray:
    # same call as a user's: one prompt, its n images seeded seed, seed+1, ...
    return pipe(prompt, seed=seed, num_images_per_prompt=n, output_type="uint8")


# ---------------------------------------------------------------- the API contract


def test_generation_answer_has_the_openai_shape_seeds_timings_and_backend(bert_url, bert_bundle):
    status, _, answer = post(bert_url, {"prompt": "a red circle", "n": 2, "seed": 41})
    assert status == 200, answer
    assert {"created", "data", "timings_ms", "backend", "precision"} <= answer.keys()
    assert [item["seed"] for item in answer["data"]] == [41, 42]
    images = images_of(answer)
    size = json.loads((Path(bert_bundle) / "manifest.json").read_text())["generation"]["image_size"]
    assert images.shape == (2, size, size, 3) and images.dtype == np.uint8
    assert {"queue", "generate", "encode", "total"} <= answer["timings_ms"].keys()
    assert answer["backend"] == "ort-cpu"


def test_png_format_answers_the_image_bytes(bert_url, bert_pipe):
    status, headers, data = post(bert_url, {"prompt": "a blue square", "seed": 5, "response_format": "png"})
    assert status == 200 and headers["content-type"] == "image/png"
    assert headers["x-edgegen-seed"] == "5"
    assert np.array_equal(png_pixels(data), in_process(bert_pipe, "a blue square", 5)[0])


def test_health_info_metrics_and_page(bert_url, bert_bundle):
    assert request(bert_url + "/v1/health")[0] == 200
    status, _, body = request(bert_url + "/v1/info")
    info = json.loads(body)
    assert status == 200 and info["bundle"] == str(bert_bundle) and info["family"] == "gan"
    assert info["replicas"] == 1 and info["max_batch"] == 8 and info["backend"] == "ort-cpu"
    post(bert_url, {"prompt": "metrics please", "seed": 1})
    status, headers, body = request(bert_url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'edgegen_requests_total{route="/v1/images/generations",status="200"}' in text
    for name in ("edgegen_request_seconds_bucket", "edgegen_batch_images_bucket", "edgegen_queue_depth"):
        assert name in text
    status, headers, body = request(bert_url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"/static/app.js" in body
    assert b"http" not in body.replace(b"http-equiv", b"")  # no CDN: nothing fetched from elsewhere
    assert request(bert_url + "/static/app.js")[0] == 200


def test_served_pixels_equal_the_pipeline_call(bert_url, bert_pipe):
    for prompt, seed, n in (
        ("a green triangle", 0, 1),
        ("a yellow star on black", 123456789, 3),
        ("x", 7, 1),
    ):
        status, _, answer = post(bert_url, {"prompt": prompt, "seed": seed, "n": n})
        assert status == 200
        assert np.array_equal(images_of(answer), in_process(bert_pipe, prompt, seed, n)), (prompt, seed)


def test_batched_requests_equal_serial_calls(bert_url, bert_pipe):
    """16 requests at once (prompts of different lengths, n of 1 and 2) share pipeline calls; each answer is
    the in-process call of that request alone."""
    jobs = [(f"shape number {i}" + " with stripes" * (i % 3), 1000 + 10 * i, 1 + i % 2) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda j: post(bert_url, {"prompt": j[0], "seed": j[1], "n": j[2]}), jobs))
    assert all(status == 200 for status, _, _ in answers)
    assert max(answer["batch_images"] for _, _, answer in answers) > 2, "no request was batched"
    for (prompt, seed, n), (_, _, answer) in zip(jobs, answers):
        assert np.array_equal(images_of(answer), in_process(bert_pipe, prompt, seed, n)), prompt


BAD_REQUESTS = [  # (body, status, the error's subject)
    ({"n": 1}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "a cat", "n": 0}, 400, "n"),
    ({"prompt": "a cat", "n": 10_000}, 400, "n"),
    ({"prompt": "a cat", "seed": -1}, 400, "seed"),
    ({"prompt": "a cat", "seed": "abc"}, 400, "seed"),
    ({"prompt": "a cat", "response_format": "url"}, 400, "response_format"),
    ({"prompt": "a cat", "size": "1024x1024"}, 400, "size"),
    ({"prompt": "a cat", "noise": [1, 2]}, 400, "noise"),
    ({"prompt": "a cat", "num_inference_steps": 2}, 400, "num_inference_steps"),  # a diffusion option
    ({"prompt": "a cat", "no_such_option": 3}, 400, "no_such_option"),
    (b'{"prompt": "a cat", ', 400, "request body"),
    (b"[1, 2]", 400, "request body"),
    (b"\xff\xfe", 400, "request body"),
    (json.dumps({"prompt": "a" * (2 * 2**20)}).encode(), 413, "request body"),
]


@pytest.mark.parametrize(
    "body, status, subject",
    BAD_REQUESTS,
    ids=[f"{s}-{sub}-{i}" for i, (_, s, sub) in enumerate(BAD_REQUESTS)],
)
def test_bad_requests_get_a_json_error_and_leave_the_service_healthy(bert_url, body, status, subject):
    got, _, answer = post(bert_url, body)
    assert got == status, answer
    assert set(answer["error"]) >= {"kind", "message", "note"} and answer["error"]["subject"] == subject
    assert (
        answer["error"]["message"].startswith(subject + " | ")
        and "Traceback" not in answer["error"]["message"]
    )
    assert request(bert_url + "/v1/health")[0] == 200


def test_a_body_just_under_the_limit_is_read(bert_url):
    body = json.dumps({"prompt": "a cat", "user": "u" * (MAX_BODY_BYTES - 100)}).encode()
    assert len(body) <= MAX_BODY_BYTES
    assert post(bert_url, body)[0] == 200


def test_a_request_failing_in_the_pipeline_call_leaves_the_others_served(bert_url):
    """noise=1.5 passes the gateway's checks (a number, an option of a gan) and is refused by the pipeline
    call itself: a 400 for that request alone."""
    payloads = [{"prompt": "fine", "seed": i} for i in range(6)] + [
        {"prompt": "bad", "seed": 1, "noise": 1.5}
    ]
    with ThreadPoolExecutor(7) as pool:
        answers = list(pool.map(lambda p: post(bert_url, p), payloads))
    assert [a[0] for a in answers] == [200] * 6 + [400]


def test_unknown_route_and_method_are_json_404(bert_url):
    for url, method in ((bert_url + "/v2/nothing", "GET"), (bert_url + "/v1/health", "DELETE")):
        status, _, body = request(url, method=method)
        assert status == 404 and json.loads(body)["error"]["kind"] == "NoSuchRouteError"


def test_no_cors_headers_unless_asked(bert_url):
    _, headers, _ = request(bert_url + "/v1/health", headers={"Origin": "http://elsewhere.example"})
    assert not any(h.lower().startswith("access-control-") for h in headers)


# ---------------------------------------------------------------- the live page in a real browser


def chromium_driver():
    """Selenium driving Debian's chromium through its chromedriver (nothing downloaded), or a skip."""
    webdriver = pytest.importorskip("selenium.webdriver")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (apt-get install chromium "
            "chromium-driver)"
        )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=900,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.mark.slow
def test_page_updates_images_as_the_prompt_changes(bert_url, tmp_path):
    """docs/serve.png is this page on the default model (see docs/serving.md); here a screenshot is kept
    under tmp_path, so a test run never rewrites the repository."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver()
    try:
        browser.get(bert_url + "/")
        wait = WebDriverWait(browser, 30)

        def first_image_src(_):
            found = browser.find_elements(By.CSS_SELECTOR, "#images img")
            return found[0].get_attribute("src") if found else None

        browser.find_element(By.ID, "prompt").send_keys("a rocket")
        first = wait.until(first_image_src)
        assert first.startswith("data:image/png;base64,")
        assert (
            len(browser.find_elements(By.CSS_SELECTOR, "#images img")) == 4
        )  # the page asks for 4 by default
        browser.find_element(By.ID, "prompt").send_keys(" on a blue background")
        second = wait.until(lambda d: (src := first_image_src(d)) != first and src)
        assert second != first
        assert "ort-cpu" in browser.find_element(By.ID, "status").text
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
        assert browser.save_screenshot(str(tmp_path / "serve.png"))
        assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        browser.quit()


# ---------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model_is_served_like_the_pipeline(deploy, default_model):
    bundle = default_model
    url = deploy(bundle=str(bundle), max_batch=8, batch_wait_ms=5)
    status, _, answer = post(url, {"prompt": "a rocket on a blue background", "seed": 3, "n": 2})
    assert status == 200 and answer["data"][0]["seed"] == 3
    pipe = Pipeline.from_bundle(bundle)
    assert np.array_equal(images_of(answer), in_process(pipe, "a rocket on a blue background", 3, 2))
    info = json.loads(request(url + "/v1/info")[2])
    assert info["bundle"] == str(bundle) and info["image_size"] == 64


# ---------------------------------------------------------------- two replicas, one killed under load


def replica_pids(handle, want: int, seconds: float = 30) -> set[int]:
    """The generator replicas' process ids, asked through Serve's router until ``want`` distinct ones
    answered."""
    pids: set[int] = set()
    deadline = time.monotonic() + seconds
    while len(pids) < want and time.monotonic() < deadline:
        try:
            pids.add(handle.describe.remote().result(timeout_s=5)["pid"])
        except Exception:  # noqa: BLE001 - a replica that is going away; ask again
            time.sleep(0.1)
    return pids


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP_NAME].deployments["Generator"]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_two_replicas_answer_every_request_while_one_is_killed(deploy, bert_bundle):
    from ray import serve

    timeout_s = 20.0
    url = deploy(bundle=str(bert_bundle), replicas=2, max_batch=4, batch_wait_ms=5, timeout_s=timeout_s)
    handle = serve.get_deployment_handle("Generator", app_name=APP_NAME)
    pids = replica_pids(handle, 2)
    assert len(pids) == 2, pids
    victim = min(pids)
    total, concurrency, kill_after = 300, 24, 60
    answered = []

    def one(i: int):
        started = time.monotonic()
        try:
            status, headers, _ = post(url, {"prompt": f"load {i % 7}", "seed": i}, timeout=timeout_s + 10)
        except OSError as e:  # a connection error is an unanswered request: the test fails on it below
            status, headers = repr(e), {}
        answered.append(i)
        if len(answered) == kill_after:
            os.kill(victim, signal.SIGKILL)
        return status, headers.get("retry-after"), time.monotonic() - started

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(total)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, sorted(set(map(str, statuses)))
    assert all(retry is not None for status, retry, _ in results if status == 503)
    assert statuses.count(200) >= total // 2, statuses.count(503)
    assert max(seconds for _, _, seconds in results) < timeout_s + 5
    deadline = time.monotonic() + 90
    while running_replicas() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running_replicas() == 2
    back = replica_pids(handle, 2)
    assert len(back) == 2 and victim not in back
    assert request(url + "/v1/health")[0] == 200
    assert post(url, {"prompt": "after", "seed": 1})[0] == 200


# ---------------------------------------------------------------- the command line


def test_serve_command_checks_its_options_before_starting_ray(bert_bundle, capsys):
    from edgegen.runtime.cli import main

    assert main(["serve", str(bert_bundle), "--replicas", "0"]) == 2
    assert "--replicas | expected a positive integer" in capsys.readouterr().err
    assert main(["serve", str(bert_bundle), "--cors", "elsewhere"]) == 2
    assert main(["serve", str(bert_bundle.parent / "no-such-bundle")]) == 1
    assert "no-such-bundle" in capsys.readouterr().err
    assert main(["serve", "--bundle", str(bert_bundle.parent / "no-such-bundle")]) == 1  # the same as BUNDLE
    assert "no-such-bundle" in capsys.readouterr().err
