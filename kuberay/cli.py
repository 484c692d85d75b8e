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
    r.set_defaults(func=run_render)
    v = sub.add_parser(
        "validate",
        help="check manifests offline: CRD schemas, KubeRay's operator rules, Kubernetes schemas, gpuserve rules",
        description="Check every document of FILE without an API server. Exit 1 with one line per finding "
        "(document, path, [rule], message; fix) or 0 when clean.",
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
    opts = RenderOptions(
        import_path=args.target,
        image=args.image,
        namespace=args.namespace,
        auth_secret=args.auth_secret,
        api_key_secret=args.api_key_secret,
        operator_namespace=args.operator_namespace,
        monitoring_namespace=args.monitoring_namespace,
    )
    text = to_yaml(render(spec, opts))
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def run_validate(args: argparse.Namespace, passthrough: list[str] | None = None) -> int:
    import yaml

    from kuberay.validate import validate_file

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
    if findings:
        print(f"{len(findings)} problem(s) in {args.file}", file=sys.stderr)
        return 1
    print(f"{args.file}: valid")
    return 0
