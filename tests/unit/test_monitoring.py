"""The shipped alerting rules and dashboard: promtool checks and unit-tests the rules; every metric they
read is one gpuserve (or Ray Serve) exports."""

import json
import re
import subprocess
from pathlib import Path

import yaml

from serving.monitoring import ALERTS, ALERTS_TEST, DASHBOARD, asset_path
from tests.conftest import require_prometheus_binary

ROOT = Path(__file__).resolve().parents[2]


def promtool() -> str:
    return require_prometheus_binary("promtool")


def test_promtool_checks_the_alerting_rules():
    out = subprocess.run([promtool(), "check", "rules", str(asset_path(ALERTS))], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 4 rules found" in out.stdout


def test_promtool_unit_tests_fire_each_alert_and_only_when_due():
    out = subprocess.run(
        [promtool(), "test", "rules", ALERTS_TEST], cwd=asset_path(ALERTS).parent, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tests = yaml.safe_load(asset_path(ALERTS_TEST).read_text())["tests"]
    alerted = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    rules = {r["alert"] for g in yaml.safe_load(asset_path(ALERTS).read_text())["groups"] for r in g["rules"]}
    assert alerted == rules  # every rule has a test in which it fires


def exported_metric_names() -> set[str]:
    """Names as Prometheus sees them: Ray prefixes 'ray_'; counters end in '_total'."""
    src = (ROOT / "serving" / "_private" / "metrics.py").read_text()
    names = {"ray_" + n for n in re.findall(r'Gauge\(\s*"(gpuserve_[a-z_]+)"', src)}
    names |= {"ray_" + n + "_total" for n in re.findall(r'Counter\(\s*"(gpuserve_[a-z_]+)"', src)}
    status = (ROOT / "serving" / "_private" / "status_metrics.py").read_text()
    names |= set(re.findall(r'"(gpuserve_[a-z_]+)"', status))
    return names


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:ray_)?(?:gpuserve|serve)_[a-z_]+)\b", expr))


def test_alerts_and_dashboard_read_only_metrics_that_exist():
    known = exported_metric_names()
    rules = yaml.safe_load(asset_path(ALERTS).read_text())["groups"][0]["rules"]
    dash = json.loads(asset_path(DASHBOARD).read_text())
    exprs = [r["expr"] for r in rules] + [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set().union(*(metrics_in(e) for e in exprs))
    assert used and used <= known, used - known
    assert {
        "ray_gpuserve_gpu_memory_used_bytes",
        "ray_gpuserve_oom_total",
        "gpuserve_pending_replicas",
        "ray_gpuserve_requests_total",
    } <= used
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
