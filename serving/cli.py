"""The ``gpuserve`` command line.

``gpuserve run`` is a thin wrapper over Ray Serve's own ``serve run``: the same
targets (``module:app`` or a Serve config YAML), the same options, plus the
defaults gpuserve wants (Hugging Face hub offline, the current directory
importable).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _cmd_run(args: argparse.Namespace, passthrough: list[str]) -> int:
    # Replicas inherit the driver's environment through Ray's runtime env only
    # for variables set here, before Ray starts.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Ray's HTTP proxies, started by `serve run` below, load gpuserve's middleware (a lost gateway
    # answers 503 with Retry-After, not 500).
    from serving.protocol import PROXY_ENV

    for k, v in PROXY_ENV.items():
        os.environ.setdefault(k, v)
    from ray.serve.scripts import cli as serve_cli

    argv = ["run", *passthrough, args.target]
    if "--app-dir" not in passthrough and "-d" not in passthrough:
        argv[1:1] = ["--app-dir", "."]
    with contextlib.suppress(KeyboardInterrupt):
        serve_cli.main(args=argv, prog_name="gpuserve run", standalone_mode=False)
    return 0


def _cmd_prefetch(args: argparse.Namespace, passthrough: list[str]) -> int:
    import json

    from serving.weights import prefetch, verify_entry

    try:
        entry = prefetch(args.model, args.cache_dir, args.digest_dir)
        manifest = verify_entry(entry, "sha256")
    except (FileNotFoundError, OSError) as e:
        print(f"gpuserve prefetch: {e}", file=sys.stderr)
        return 1
    total = sum(f["size"] for f in manifest["files"].values())
    print(json.dumps({"entry": str(entry), "files": len(manifest["files"]), "bytes": total}))
    return 0


def _cmd_status(args: argparse.Namespace, passthrough: list[str]) -> int:
    import json
    import time

    import ray

    from serving.status import render, status

    ray.init(address=args.address, log_to_driver=False, logging_level="ERROR")
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        from serving._private.status_metrics import StatusGauges

        gauges = StatusGauges()
        start_http_server(args.metrics_port, addr=args.metrics_host, registry=gauges.registry)
        print(f"gpuserve status: serving metrics on {args.metrics_host}:{args.metrics_port}", file=sys.stderr)
        while True:
            gauges.update(status())
            time.sleep(args.interval_s)
    reports = status()
    if args.json:
        print(json.dumps([r.__dict__ | {"pending": r.pending} for r in reports], indent=2))
    else:
        print(render(reports) or "no Serve deployments")
    return 0


def _cmd_drain(args: argparse.Namespace, passthrough: list[str]) -> int:
    import json

    from serving._private.drain import drain_node

    try:
        result = drain_node(args.address, args.timeout_s, args.node_id)
    except (ConnectionError, RuntimeError, ValueError) as e:
        # No Ray to drain (it already stopped, or never started): nothing is running here either.
        print(f"gpuserve drain: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict()))
    if not result.accepted:
        print(f"gpuserve drain: the GCS refused the drain: {result.rejection}", file=sys.stderr)
    return 0 if result.drained else 1


def _build_parser() -> argparse.ArgumentParser:
    from serving import __version__

    parser = argparse.ArgumentParser(
        prog="gpuserve", description="Ray Serve inference serving for GPU clusters."
    )
    parser.add_argument("--version", action="version", version=f"gpuserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run an app locally, like `serve run` (extra options go to `serve run`)",
        description="Start TARGET (module:app or a Serve config YAML) on a local Ray instance. "
        "Unrecognised options are passed to `serve run`, e.g. --address, --blocking/--non-blocking.",
    )
    run.add_argument("target", help="import path 'module:app' or a Serve config file")
    run.set_defaults(func=_cmd_run)
    pre = sub.add_parser(
        "prefetch",
        help="copy a model into a verified local weight cache",
        description="Copy MODEL (a local directory or package://NAME) into CACHE_DIR with a SHA-256 manifest, "
        "atomically. Replicas whose model.cache_dir is CACHE_DIR then load from it after verifying it. "
        "Run it in an init container so a new node has the weights before Ray starts.",
    )
    pre.add_argument("model", help="model directory or package://NAME")
    pre.add_argument("--cache-dir", required=True, help="the cache directory (node-local disk or shared volume)")
    pre.add_argument(
        "--digest-dir",
        help="record the entry's manifest digest here, outside the cache (replicas with "
        "GPUSERVE_WEIGHT_DIGEST_DIR set refuse an entry that does not match it)",
    )
    pre.set_defaults(func=_cmd_prefetch)
    dr = sub.add_parser(
        "drain",
        help="drain this Ray node (a worker pod's preStop hook) and wait for its replicas to move",
        description="Ask the GCS to drain a node with a deadline TIMEOUT_S away; Serve then starts replacement "
        "replicas elsewhere and stops the node's replicas gracefully. Wait until none is left (exit 0) or the "
        "deadline passes (exit 1); print what happened as JSON.",
    )
    dr.add_argument("--timeout-s", type=float, required=True, help="longest wait; the pod's grace period must exceed it")
    dr.add_argument("--node-id", help="hex id of the node to drain (default: the node this runs on)")
    dr.add_argument("--address", default="auto", help="Ray cluster address (default: the local node's cluster)")
    dr.set_defaults(func=_cmd_drain)
    st = sub.add_parser(
        "status",
        help="replicas by state per deployment, and why pending replicas wait",
        description="Connect to a running Ray cluster and list each Serve deployment's replicas by state; for "
        "each replica Ray could not place, say which pool it waits for, how many of the pool's GPUs are in use, "
        "and whether the cluster autoscaler can still add a node.",
    )
    st.add_argument("--address", default="auto", help="Ray cluster address (default: the running local cluster)")
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    st.add_argument("--metrics-port", type=int, help="keep running and serve Prometheus metrics on this port")
    st.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default loopback)")
    st.add_argument("--interval-s", type=float, default=10.0, help="refresh period with --metrics-port")
    st.set_defaults(func=_cmd_status)
    from autoscaling.cli import add_parser as add_simulate
    from kuberay.cli import add_parsers as add_kuberay

    add_simulate(sub)
    add_kuberay(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gpuserve`` console script."""
    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if rest and args.command != "run":
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())
