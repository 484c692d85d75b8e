"""``gpuserve render`` and ``gpuserve validate``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    """Register ``render`` and ``validate`` on the gpuserve CLI."""
    r = sub.add_parser(
        "render",
        help="render the RayService (and what it needs) for a ServingSpec",
        description="Render MODULE:ATTR (a ServingSpec, or a single ModelDeployment) into a multi-document YAML: "
        "the RayService with one worker group per pool, a NetworkPolicy, a PodMonitor and a PrometheusRule.",
    )
    r.add_argument("target", help="import path 'module:attribute' of a ServingSpec or ModelDeployment")
    r.add_argument("-o", "--output", help="write here instead of standard output")
    r.add_argument("--image", default="gpuserve:0.1.0", help="container image with gpuserve and your code")
    r.add_argument("--namespace", help="namespace of every document")
    r.add_argument("--auth-secret", default="ray-auth-token", help="Secret with Ray's cluster token (key auth_token)")
    r.add_argument("--api-key-secret", default="gpuserve-api-keys", help="Secret with data-plane API keys (key api-keys)")
    r.add_argument("--operator-namespace", default="kuberay-system", help="namespace of the KubeRay operator")
    r.add_argument("--monitoring-namespace", default="monitoring", help="namespace of Prometheus")
    r.add_argument(
        "--gcs-ft-redis",
        metavar="HOST:PORT",
        help="keep the GCS state in this Redis (GCS fault tolerance): a lost head restarts without the workers "
        "losing their replicas",
    )
    r.add_argument("--gcs-ft-redis-secret", metavar="NAME", help="Secret with the Redis password (key password)")
    r.add_argument(
        "--gateway-class",
        metavar="NAME",
        help="Gateway API class for KubeRay's incremental upgrade (NewClusterWithIncrementalUpgrade); without "
        "it, upgrades start a whole new cluster beside the old one (`gpuserve validate` says if the pools hold both)",
    )
    r.add_argument("--upgrade-max-surge-percent", type=int, default=25, help="incremental upgrade: most extra capacity, percent (default 25)")
    r.add_argument("--upgrade-step-size-percent", type=int, default=25, help="incremental upgrade: traffic moved per step, percent (default 25)")
    r.add_argument("--upgrade-interval-s", type=int, default=60, help="incremental upgrade: seconds between steps (default 60)")
    r.add_argument(
        "--weight-cache",
        default="ephemeral",
        metavar="ephemeral|pvc:NAME|hostPath:/PATH",
        help="volume of the weight cache (default: an ephemeral volume per pod; hostPath only when asked for)",
    )
    r.add_argument("--weight-cache-size-bytes", type=int, default=100 << 30, help="size of the ephemeral weight-cache volume")
    r.add_argument("--weight-cache-storage-class", help="storage class of the ephemeral weight-cache volume")
    r.set_defaults(func=run_render)
    v = sub.add_parser(
        "validate",
        help="check manifests offline: CRD schemas, KubeRay's operator rules, Kubernetes schemas, gpuserve rules",
        description="Check every document of FILE without an API server: one line per finding (document, path, "
        "[rule], message; fix; warnings prefixed 'warning:'), then what each RayService's upgrade strategy needs "
        "of its GPU pools. Exit 1 when there is an error, 0 otherwise.",
    )
    v.add_argument("file", help="a YAML file (multi-document)")
    v.add_argument(
        "--crd-dir",
        default=os.environ.get("GPUSERVE_CRD_DIR"),
        help="directory with your cluster's KubeRay CRDs (default: $GPUSERVE_CRD_DIR)",
    )
    v.add_argument("--k8s-version", default="1.31", help="Kubernetes version whose schemas to use (default 1.31)")
    v.set_defaults(func=run_validate)


def run_render(args: argparse.Namespace, passthrough: list[str] | None = None) -> int:
    from kuberay.render import RenderOptions, render, to_yaml
    from serving.builder import load_spec

    sys.path.insert(0, os.getcwd())
    try:
        spec = load_spec(args.target)
    except (ValueError, ImportError, AttributeError) as e:
        print(f"gpuserve render: {e}", file=sys.stderr)
        return 2
    try:
        opts = RenderOptions(
            import_path=args.target,
            image=args.image,
            namespace=args.namespace,
            auth_secret=args.auth_secret,
            api_key_secret=args.api_key_secret,
            operator_namespace=args.operator_namespace,
            monitoring_namespace=args.monitoring_namespace,
            gcs_ft_redis=args.gcs_ft_redis,
            gcs_ft_redis_secret=args.gcs_ft_redis_secret,
            gateway_class=args.gateway_class,
            upgrade_max_surge_percent=args.upgrade_max_surge_percent,
            upgrade_step_size_percent=args.upgrade_step_size_percent,
            upgrade_interval_s=args.upgrade_interval_s,
            weight_cache=args.weight_cache,
            weight_cache_size_bytes=args.weight_cache_size_bytes,
            weight_cache_storage_class=args.weight_cache_storage_class,
        )
    except ValueError as e:
        print(f"gpuserve render: {e}", file=sys.stderr)
        return 2
    text = to_yaml(render(spec, opts))
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def run_validate(args: argparse.Namespace, passthrough: list[str] | None = None) -> int:
    import yaml

    from kuberay.validate import upgrade_fits, validate_file

    if not args.crd_dir:
        print("gpuserve validate: --crd-dir is required (or set GPUSERVE_CRD_DIR): your cluster's KubeRay CRDs", file=sys.stderr)
        return 2
    try:
        findings = validate_file(args.file, args.crd_dir, args.k8s_version)
    except (OSError, yaml.YAMLError) as e:
        print(f"gpuserve validate: {e}", file=sys.stderr)
        return 2
    for f in findings:
        print(f)
    with open(args.file) as fh:
        for doc in yaml.safe_load_all(fh):
            if isinstance(doc, dict) and doc.get("kind") == "RayService":
                for _, fit in upgrade_fits(doc):
                    print(f"{(doc.get('metadata') or {}).get('name', '?')}: {fit}")
    errors = [f for f in findings if f.severity == "error"]
    warnings = len(findings) - len(errors)
    if errors:
        print(f"{len(errors)} problem(s), {warnings} warning(s) in {args.file}", file=sys.stderr)
        return 1
    print(f"{args.file}: valid" + (f", {warnings} warning(s)" if warnings else ""))
    return 0
