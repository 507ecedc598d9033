"""edgegen serve under load: requests/s and p50/p99 latency against concurrency, for 1 and 2 replicas, with
batching on and off, on the default model; and what HTTP + Ray cost per request against the in-process call.

    python -m benchmarks.serve_load [BUNDLE] [--concurrency 1,4,16,64] [--replicas 1,2] [--seconds 8]

Starts its own local Ray cluster and Serve on a free loopback port, deploys each configuration in turn, and
drives it with a thread pool of keep-alive HTTP connections (the load generator shares the machine's cores
with the service: on a small machine it is part of what is measured). Writes
benchmarks/results/serve_load.json and serve_load.png.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    f"a {c} on a {b} background"
    for c in ("rocket", "cat", "apple", "star", "heart", "tree")
    for b in ("red", "blue", "green", "yellow")
]
BATCHING = {"on": {"max_batch": 16, "batch_wait_ms": 5.0}, "off": {"max_batch": 1, "batch_wait_ms": 0.0}}


@dataclass
class Level:
    replicas: int
    batching: str
    concurrency: int
    requests: int
    ok: int
    busy: int  # 503 answers
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_batch_images: float


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Client:
    """One keep-alive connection per thread (a new TCP connection per request would measure the client)."""

    def __init__(self, port: int):
        self.port = port
        self.local = threading.local()

    def post(self, payload: dict) -> tuple[int, dict]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(
                "POST", "/v1/images/generations", json.dumps(payload), {"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self.local.conn = None
            conn.close()
            raise
        return response.status, (json.loads(body) if response.status == 200 else {})


def run_level(
    client: Client, concurrency: int, seconds: float, min_requests: int
) -> tuple[list, list, int, float]:
    """Closed loop: ``concurrency`` clients each send their next request when the last is answered."""
    latencies, batches, busy = [], [], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))

    def worker():
        while True:
            with lock:
                i = next(counter)
                if time.monotonic() > stop_at and i >= min_requests:
                    return
            t0 = time.perf_counter()
            status, answer = client.post({"prompt": PROMPTS[i % len(PROMPTS)], "seed": i})
            elapsed = time.perf_counter() - t0
            with lock:
                if status == 200:
                    latencies.append(elapsed * 1000)
                    batches.append(answer["batch_images"])
                else:
                    busy[0] += 1

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return latencies, batches, busy[0], time.monotonic() - start


def in_process_ms(bundle: str, calls: int) -> dict:
    """p50 of the in-process call alone and with the PNG encoding the service adds."""
    from edgegen.runtime import Pipeline
    from edgegen.serve import generate_pixels
    from edgegen.serve.api import png_bytes

    pipe = Pipeline.from_bundle(bundle)
    call, with_png = [], []
    for i in range(calls + 10):
        t0 = time.perf_counter()
        pixels = generate_pixels(pipe, [PROMPTS[i % len(PROMPTS)]], [i], {})
        t1 = time.perf_counter()
        png_bytes(pixels[0])
        t2 = time.perf_counter()
        if i >= 10:
            call.append((t1 - t0) * 1000)
            with_png.append((t2 - t0) * 1000)
    return {
        "call_p50_ms": statistics.median(call),
        "call_and_png_p50_ms": statistics.median(with_png),
        "backend": pipe.backend,
        "precision": pipe.precision,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(levels: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(lv.replicas, lv.batching) for lv in levels}):
        rows = [lv for lv in levels if (lv.replicas, lv.batching) == key]
        label = f"{key[0]} replica(s), batching {key[1]}"
        ax_rps.plot([r.concurrency for r in rows], [r.rps for r in rows], marker="o", label=label)
        ax_p99.plot([r.concurrency for r in rows], [r.p99_ms for r in rows], marker="o", label=label)
    for ax, title in ((ax_rps, "requests/s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_p99.set_yscale("log")
    ax_rps.legend(fontsize=8)
    fig.suptitle("edgegen serve, default model, this machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(levels: list[Level], base: dict) -> str:
    lines = [
        "| replicas | batching | clients | req/s | p50 ms | p99 ms | mean batch | 503s |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {lv.replicas} | {lv.batching} | {lv.concurrency} | {lv.rps:.1f} | {lv.p50_ms:.1f} | "
        f"{lv.p99_ms:.1f} | {lv.mean_batch_images:.2f} | {lv.busy} |"
        for lv in levels
    ]
    lines.append(
        f"\nin-process call p50 {base['call_p50_ms']:.2f} ms (+ PNG encoding: "
        f"{base['call_and_png_p50_ms']:.2f} ms), {base['backend']} {base['precision']}"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", help="default: the shipped default model")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--batching", default="on,off")
    ap.add_argument("--seconds", type=float, default=8.0, help="per level (default 8)")
    ap.add_argument("--min-requests", type=int, default=20, help="per level, at least (default 20)")
    ap.add_argument("--out", default=str(RESULTS / "serve_load"), help="path stem of the .json and .png")
    args = ap.parse_args()
    import ray
    from edgegen.serve import APP_NAME, ServeConfig, build_app
    from ray import serve

    bundle = args.bundle
    if bundle is None:
        from edgegen.export import default_bundle

        bundle = str(default_bundle())
    base = in_process_ms(bundle, 200)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = Client(port)
    levels: list[Level] = []
    try:
        for replicas in map(int, args.replicas.split(",")):
            for batching in args.batching.split(","):
                config = ServeConfig(
                    bundle=bundle,
                    port=port,
                    replicas=replicas,
                    max_queued=256,
                    timeout_s=60,
                    **BATCHING[batching],
                )
                serve.run(build_app(config), name=APP_NAME, route_prefix="/")
                run_level(client, 4, 1.0, 20)  # warm-up: sessions, buffers, connections
                for concurrency in map(int, args.concurrency.split(",")):
                    latencies, batches, busy, seconds = run_level(
                        client, concurrency, args.seconds, args.min_requests
                    )
                    level = Level(
                        replicas,
                        batching,
                        concurrency,
                        len(latencies) + busy,
                        len(latencies),
                        busy,
                        round(seconds, 2),
                        len(latencies) / seconds,
                        percentile(latencies, 50),
                        percentile(latencies, 99),
                        float(np.mean(batches)) if batches else 0.0,
                    )
                    levels.append(level)
                    print(
                        f"replicas {replicas}, batching {batching}, {concurrency:3d} clients: "
                        f"{level.rps:7.1f} req/s, p50 {level.p50_ms:7.1f} ms, p99 {level.p99_ms:7.1f} ms, "
                        f"mean batch {level.mean_batch_images:.2f}, 503s {busy}",
                        flush=True,
                    )
    finally:
        serve.shutdown()
        ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"bundle": bundle, "in_process": base, "levels": [asdict(lv) for lv in levels]}, indent=2)
    )
    plot(levels, out.with_suffix(".png"))
    print(table(levels, base))
    one = next((lv for lv in levels if (lv.replicas, lv.batching, lv.concurrency) == (1, "off", 1)), None)
    if one is not None:
        local = base["call_and_png_p50_ms"]
        print(
            f"HTTP + Ray per request at 1 client: {one.p50_ms - local:.2f} ms "
            f"(served p50 {one.p50_ms:.2f} ms - in-process call with PNG {local:.2f} ms)"
        )
    for replicas in sorted({lv.replicas for lv in levels}):
        on = next(
            (lv for lv in levels if (lv.replicas, lv.batching, lv.concurrency) == (replicas, "on", 16)), None
        )
        off = next(
            (lv for lv in levels if (lv.replicas, lv.batching, lv.concurrency) == (replicas, "off", 16)), None
        )
        if on and off:
            print(
                f"batching at 16 clients, {replicas} replica(s): {on.rps / off.rps:.2f}x req/s, "
                f"p99 {off.p99_ms:.0f} -> {on.p99_ms:.0f} ms"
            )


if __name__ == "__main__":
    main()
