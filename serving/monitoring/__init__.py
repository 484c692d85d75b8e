"""Monitoring assets shipped with gpuserve: Prometheus alerting rules, their unit tests, a Grafana dashboard.

Read them with :func:`asset_path`; ``kuberay`` renders the rules into a ``PrometheusRule``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ALERTS", "ALERTS_TEST", "DASHBOARD", "asset_path"]

ALERTS = "alerts.yaml"
ALERTS_TEST = "alerts_test.yaml"
DASHBOARD = "grafana-dashboard.json"


def asset_path(name: str) -> Path:
    """The installed path of a monitoring asset."""
    return Path(__file__).resolve().parent / name
