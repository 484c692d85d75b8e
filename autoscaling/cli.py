"""``gpuserve simulate``: replay a trace against several policies in one run."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

DEFAULT_POLICIES = ["predictive", "ray_default", "kpa", "hpa", "oracle"]


def add_parser(sub: Any) -> None:
    """Register the ``simulate`` sub-command on an argparse sub-parser set."""
    from autoscaling.simulator import SimConfig

    d = SimConfig()
    p = sub.add_parser(
        "simulate",
        help="replay a request trace against autoscaling policies on a simulated GPU pool",
        description="Replay TRACE (Azure per-request CSV, ServeGen rate CSV, or generic "
        "'arrival_s,input_tokens,output_tokens' CSV; detected from the header) against each --policy on the "
        "same simulated GPU pool, and report SLO attainment, rejections, latency, GPU-hours and scale events.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="trace CSV file")
    src.add_argument(
        "--scenario",
        metavar="NAME",
        help="a synthetic scenario instead of a trace: on_off_bursts, mmpp, diurnal_flash_crowd, slow_ramp, "
        "abrupt_drop, idle_then_surge (drawn with --seed, at the rate --peak-replicas needs)",
    )
    p.add_argument(
        "--policy",
        action="append",
        metavar="NAME",
        help=f"policy name or 'module:factory' import path; repeatable (default: {' '.join(DEFAULT_POLICIES)})",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="POLICY.KEY=VALUE",
        help="a policy parameter, e.g. predictive.headroom_beta=1.5 (VALUE is JSON, else a string); repeatable",
    )
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT ('-' for standard output)")
    p.add_argument("--plot", metavar="OUT.png", help="plot load, replicas and nodes over time for each policy")
    p.add_argument("--slo-s", type=float, default=d.slo_s, help=f"time-to-first-token SLO (default {d.slo_s})")
    p.add_argument(
        "--slo-target",
        type=float,
        default=d.slo_target,
        help=f"fraction of requests within the SLO that meets it; the oracle plans for it (default {d.slo_target})",
    )
    p.add_argument(
        "--score-from-s",
        type=float,
        default=None,
        help="score requests arriving from this time on (default: the warm start, hold + longest provisioning + "
        "replica start; 0 scores the whole trace)",
    )
    p.add_argument("--deadline-s", type=float, default=d.deadline_s, help=f"queue deadline (default {d.deadline_s})")
    p.add_argument(
        "--max-queued-requests", type=int, default=d.max_queued_requests, help="deployment-wide queue bound"
    )
    p.add_argument(
        "--provision-delay-s",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=list(d.provision_delay_s),
        help=f"GPU node provisioning delay, uniform in [MIN, MAX] (default {d.provision_delay_s[0]:g} {d.provision_delay_s[1]:g})",
    )
    p.add_argument("--replica-start-s", type=float, default=d.replica_start_s, help="replica load + warm-up on a ready node")
    p.add_argument("--idle-timeout-s", type=float, default=d.idle_timeout_s, help="idle node release delay")
    p.add_argument("--slots-per-replica", type=int, default=d.slots_per_replica, help="requests one replica serves at once")
    p.add_argument(
        "--service-time-s", type=float, default=d.service_time_s, help="service time where the trace has no tokens"
    )
    p.add_argument("--prefill-s-per-token", type=float, default=d.prefill_s_per_token)
    p.add_argument("--decode-s-per-token", type=float, default=d.decode_s_per_token)
    p.add_argument(
        "--peak-replicas",
        type=float,
        default=d.peak_replicas,
        help="rescale the trace so its peak needs this many replicas at full use (0: keep the trace's rate)",
    )
    p.add_argument("--max-window-cv", type=float, default=d.max_window_cv, help="cap on a rate window's CV")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def parse_params(items: list[str], policies: list[str]) -> dict[str, dict[str, Any]]:
    """``POLICY.KEY=VALUE`` strings → {policy: {key: value}}.

    Raises:
        ValueError: a malformed item or one naming a policy not being run.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, eq, value = item.partition("=")
        name, dot, key = head.rpartition(".")
        if not eq or not dot or not name or not key:
            raise ValueError(f"--param {item!r}: expected POLICY.KEY=VALUE, e.g. predictive.headroom_beta=1.5")
        if name not in policies:
            raise ValueError(f"--param {item!r}: policy {name!r} is not among --policy {policies}")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(name, {})[key] = parsed
    return out


def run(args: argparse.Namespace, passthrough: list[str] | None = None) -> int:
    """Run the simulation the arguments describe; prints a table, writes JSON and a plot if asked."""
    from autoscaling.policy import make_policy
    from autoscaling.simulator import SimConfig, prepare, simulate
    from autoscaling.traces import TraceFormatError, load_trace

    names = args.policy or list(DEFAULT_POLICIES)
    try:
        params = parse_params(args.param, names)
        cfg = SimConfig(
            slo_s=args.slo_s,
            slo_target=args.slo_target,
            score_from_s=args.score_from_s,
            deadline_s=args.deadline_s,
            max_queued_requests=args.max_queued_requests,
            provision_delay_s=tuple(args.provision_delay_s),
            replica_start_s=args.replica_start_s,
            idle_timeout_s=args.idle_timeout_s,
            slots_per_replica=args.slots_per_replica,
            service_time_s=args.service_time_s,
            prefill_s_per_token=args.prefill_s_per_token,
            decode_s_per_token=args.decode_s_per_token,
            peak_replicas=args.peak_replicas or None,
            max_window_cv=args.max_window_cv,
            seed=args.seed,
        )
        policies = {n: make_policy(n, **params.get(n, {})) for n in names}
        trace = load_trace(args.trace) if args.trace else _scenario(args.scenario, cfg)
    except (ValueError, TraceFormatError, FileNotFoundError) as e:
        print(f"gpuserve simulate: {e}", file=sys.stderr)
        return 2
    progress = sys.stderr.isatty()
    prepared = prepare(trace, cfg)
    results = [simulate(prepared, pol, cfg, name=n, progress=progress) for n, pol in policies.items()]
    doc = {
        "scored_from_s": cfg.scored_from_s(),
        "trace": {
            "path": str(args.trace) if args.trace else None,
            "source": trace.source,
            "engine": prepared.kind,
            "duration_s": round(prepared.duration_s, 1),
            "rate_scale": prepared.scale,
            "mean_service_s": round(prepared.work_s, 4),
        },
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "params": params,
        "policies": {r.policy: r.summary() for r in results},
    }
    _print_table(results, cfg.scored_from_s(), sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.plot:
        from autoscaling.plot import plot_timelines

        try:
            plot_timelines(results, prepared, cfg, args.plot, title=trace.source)
        except ImportError as e:
            print(f"gpuserve simulate: --plot needs matplotlib ({e}); pip install 'gpuserve[sim]'", file=sys.stderr)
            return 2
    return 0


def _scenario(name: str, cfg: Any) -> Any:
    from autoscaling.scenarios import make_scenario

    return make_scenario(name, peak_rate_per_s=cfg.peak_rate_per_s(), seed=cfg.seed)


def _print_table(results: list[Any], scored_from_s: float, out: Any) -> None:
    oracle = next((r for r in results if r.policy == "oracle"), None)
    print(
        f"scored from {scored_from_s:g} s (warm start: requests arriving earlier and GPU time before it are not counted)",
        file=out,
    )
    head = f"{'policy':<14}{'slo':>9}{'rejected':>10}{'p50_s':>8}{'p99_s':>8}{'gpu_h':>10}{'x_oracle':>9}{'events':>8}{'wall_s':>8}"
    print(head, file=out)
    for r in results:
        print(
            f"{r.policy:<14}{r.slo_attainment:>9.4f}{r.rejected_fraction:>10.4f}{r.p50_latency_s:>8.2f}"
            f"{r.p99_latency_s:>8.2f}{r.gpu_hours:>10.1f}"
            f"{(f'{r.gpu_hours / oracle.gpu_hours:.3f}' if oracle and oracle.gpu_hours > 0 else '-'):>9}"
            f"{r.scale_events:>8d}{r.wall_s:>8.2f}",
            file=out,
        )
