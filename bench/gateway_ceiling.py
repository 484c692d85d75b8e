"""The gateway's ceiling: where its throughput goes, and what it is when the gateways have cores of their own.

Issue 14 asks for gateway throughput at saturation >= 0.9x direct on the same machine. ``bench/overload.py``
measures 0.58-0.61x on the 2-core development machine, where the load generator, Ray's proxy, the gateways
and the replica share both cores. This bench measures the same two arms (the same replica code; a no-op
model, ``SLOW:0``, 64 slots; ``wrk`` with 64 connections for ``--seconds``) in two layouts, in one run:

* ``shared``: every process may run on every core (as ``bench/overload.py``);
* ``gateways_own_core``: the server (Ray's processes: proxy, controller, replica, GCS, raylet) on core 1,
  the load generator on core 0, and in the gateway arm the gateway replicas on core 0 too: the layout a
  deployment has when the gateways run on a CPU pool of their own (``ServingSpec.gateway_pool``), where
  they take no cycles from the proxy and the model replicas.

Per arm it also counts the CPU seconds each kind of process spent during the load (from ``/proc`` via
psutil: proxy, gateway, replica, controller, other Ray processes, the load generator), per request answered:
where the gateway's hop costs. ``gateway_counts`` are the gateways' own (their ``failed`` are the requests
in flight when wrk closed its connections: ``client_disconnected``). Prints one JSON document::

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/gateway_ceiling.py > ceiling.json
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/gateway_ceiling.py --gateway-replicas 1   # one gateway

Needs ``wrk`` (Debian's package) and at least 2 cores.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import types

from bench.overload import TASK, deploy_gpuserve, deploy_stock, psutil_module, run_wrk, urlopen_text

LAYOUTS = ("shared", "gateways_own_core")
SLOTS = 64


def role(title: str) -> str:
    """Which part of the chain a process is, from its title (Ray names its workers ``ray::<actor>``)."""
    if "ProxyActor" in title:
        return "proxy"
    if "ServeController" in title:
        return "controller"
    if "ServeReplica" in title:
        return "gateway" if "gateway" in title.lower() else "replica"
    return "other_ray"


def ray_processes():
    """This process's descendants (GCS, raylet, Ray's workers) with their roles."""
    psutil = psutil_module()
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            out.append((p, role(" ".join(p.cmdline()) or p.name())))
    return out


def pin(layout: str, procs) -> None:
    """Place the server's processes for ``layout`` (the load generator is placed when it starts)."""
    psutil = psutil_module()
    every = set(range(os.cpu_count() or 1))
    for p, r in procs:
        cores = every if layout == "shared" else ({0} if r == "gateway" else {1})
        # Affinity is per thread on Linux: every thread of the process, not only its main one.
        with contextlib.suppress(psutil.Error):
            for t in p.threads():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(t.id, cores)


def cpu_s(procs) -> dict:
    psutil = psutil_module()
    out = {}
    for p, r in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = (r, t.user + t.system)
    return out


def measure(url: str, seconds: float, layout: str) -> dict:
    procs = ray_processes()
    pin(layout, procs)
    time.sleep(1.0)
    before = cpu_s(procs)
    res = run_wrk(url, seconds, cores=None if layout == "shared" else [0])
    after = cpu_s(procs)
    by_role: dict = {}
    for pid, (r, s) in after.items():
        if pid in before:
            by_role[r] = by_role.get(r, 0.0) + s - before[pid][1]
    by_role["load_generator"] = res.pop("wrk_cpu_s")
    ok = max(1, res["ok"])
    res["cpu_ms_per_request"] = {r: round(1000 * s / ok, 3) for r, s in sorted(by_role.items())}
    res["cpu_ms_per_request_server"] = round(
        sum(v for r, v in res["cpu_ms_per_request"].items() if r != "load_generator"), 3
    )
    res["processes"] = sorted({r for _, r in procs})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds of saturating load per arm")
    ap.add_argument("--gateway-replicas", type=int, default=None, help="gateways in the gateway arm (default: queue.gateway_replicas' default)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {LAYOUTS}")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("bench/gateway_ceiling.py needs wrk (apt-get install wrk)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench/gateway_ceiling.py needs at least 2 cores")
    layouts = [x for x in args.layouts.split(",") if x]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        sys.exit(f"--layouts: unknown {unknown}; valid: {list(LAYOUTS)}")
    from serving.testing import free_port, json_stdout

    stdout = json_stdout()
    import ray
    from ray import serve

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    bench_args = types.SimpleNamespace(task=TASK, slots=SLOTS)
    from serving import QueueSpec

    gateways = args.gateway_replicas or QueueSpec.model_fields["gateway_replicas"].default
    out = {"bench": "gateway_ceiling", "seconds": args.seconds, "gateway_replicas": gateways, "slots": SLOTS, "connections": 64, "cores": os.cpu_count()}
    try:
        for layout in layouts:
            row = {}
            deploy_stock(bench_args, slots=SLOTS)
            row["direct"] = measure(base + "/stock/v1/embeddings", args.seconds, layout)
            serve.delete("stock")
            deploy_gpuserve(bench_args, max_queued=1024, slots=SLOTS, gateway_replicas=args.gateway_replicas)
            row["gateway"] = measure(base + "/gpuserve/v1/embeddings", args.seconds, layout)
            row["gateway_counts"] = json.loads(urlopen_text(base + "/gpuserve/admission"))["counts"]
            serve.delete("gpuserve")
            row["gateway_over_direct"] = round(row["gateway"]["ok_per_s"] / row["direct"]["ok_per_s"], 3)
            out[layout] = row
            print(layout, json.dumps(row), file=sys.stderr)
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            serve.shutdown()
            ray.shutdown()
    print(json.dumps(out, indent=2), file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
