"""The shipped alerting rules and dashboard: promtool checks and unit-tests the rules; every metric they
read is one gpuserve (or Ray Serve) exports."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.monitoring import ALERTS, ALERTS_TEST, DASHBOARD, asset_path
from serving.protocol import METRICS, exported_metric_names, metric
from tests.conftest import require_prometheus_binary

ROOT = Path(__file__).resolve().parents[2]


def promtool() -> str:
    return require_prometheus_binary("promtool")


def test_promtool_checks_the_alerting_rules():
    out = subprocess.run([promtool(), "check", "rules", str(asset_path(ALERTS))], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout


def test_promtool_unit_tests_fire_each_alert_and_only_when_due():
    out = subprocess.run(
        [promtool(), "test", "rules", ALERTS_TEST], cwd=asset_path(ALERTS).parent, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tests = yaml.safe_load(asset_path(ALERTS_TEST).read_text())["tests"]
    alerted = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    rules = {r["alert"] for g in yaml.safe_load(asset_path(ALERTS).read_text())["groups"] for r in g["rules"]}
    assert alerted == rules  # every rule has a test in which it fires


def test_every_catalogued_metric_is_registered_by_the_exporters_and_nothing_else_is():
    # The protocol's catalogue is the one list of names: the exporters look each name up there
    # (an unknown name raises), and no catalogue entry is left without an exporter.
    src = "\n".join(
        (ROOT / "serving" / "_private" / f).read_text() for f in ("metrics.py", "status_metrics.py")
    )
    registered = set(re.findall(r'"(gpuserve_[a-z_]+)"', src))
    assert registered == set(METRICS)
    assert not re.search(r"(Gauge|Counter)\(\s*\"gpuserve_", src), "metric defined outside serving.protocol"
    assert metric("gpuserve_requests").exported_name == "ray_gpuserve_requests_total"
    assert metric("gpuserve_pending_replicas").exported_name == "gpuserve_pending_replicas"
    with pytest.raises(KeyError, match="valid: .*gpuserve_oom"):
        metric("gpuserve_oom_total")


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
