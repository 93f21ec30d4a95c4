"""infra/monitoring: the alert rules pass promtool's check and its unit tests (alerts_test.yml: each
alert fires on its series, and not before), and the rules and the Grafana dashboard name only metrics
that the workers and `sdfarm exporter` export."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "infra" / "monitoring"
# what the code exports: the names given to prometheus-client
EXPORTERS = (ROOT / "worker" / "metrics.py", ROOT / "producer" / "exporter.py")


def exported() -> set[str]:
    """Every series name the code exports: a counter's with _total, a histogram's _count, _sum and
    _bucket, a gauge's as it is."""
    text = "\n".join(path.read_text() for path in EXPORTERS)
    kinds = re.findall(r'(CounterMetricFamily|GaugeMetricFamily|Counter|Histogram|Gauge)\(\s*"(sdfarm_[a-z_]+)"',
                       text)
    suffixes = {"Counter": ("_total",), "Histogram": ("_count", "_sum", "_bucket"), "Gauge": ("",),
                "GaugeMetricFamily": ("",), "CounterMetricFamily": ("_total",)}
    return {name + suffix for kind, name in kinds for suffix in suffixes[kind]}


def named(expr: str) -> set[str]:
    """The sdfarm metric names an expression reads."""
    return set(re.findall(r"\bsdfarm_[a-z_]+\b", expr))


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (make test installs Debian's prometheus)")
        pytest.skip("promtool is not installed (make test installs Debian's prometheus, as root)")
    return found


def test_the_alert_rules_pass_promtools_check_and_unit_tests() -> None:
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", "alerts.yml"], cwd=MONITORING, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout
    tested = subprocess.run([tool, "test", "rules", "alerts_test.yml"], cwd=MONITORING, capture_output=True,
                            text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = subprocess.run([tool, "check", "config", "prometheus.yml"], cwd=MONITORING, capture_output=True,
                            text=True)  # compose's Prometheus, its rule file included
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_monitoring_profile_scrapes_the_workers_and_the_exporter_into_a_provisioned_grafana() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {n for n, s in services.items() if s.get("profiles") == ["monitoring"]} == {
        "exporter", "prometheus", "grafana", "flower"}
    assert services["worker-0"]["environment"]["SDFARM_METRICS_PORT"] == "9400"
    assert services["exporter"]["command"] == ["exporter", "--port", "9401"]
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]
    assert {c["job_name"]: c["static_configs"][0]["targets"] for c in scrape} == {
        "sdfarm-worker": ["worker-0:9400"], "sdfarm-exporter": ["exporter:9401"]}
    mounted = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in ("prometheus.yml", "alerts.yml", "dashboard.json", "grafana/datasources.yml",
                 "grafana/dashboards.yml"):
        assert f"./infra/monitoring/{path}:" in mounted


def test_rules_and_dashboard_read_only_metrics_that_are_exported() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = [r["expr"] for r in rules] + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    read = set().union(*(named(e) for e in exprs))
    assert {"sdfarm_queue_depth", "sdfarm_images_total", "sdfarm_workers", "sdfarm_worker_blocked",
            "sdfarm_queue_wait_seconds_bucket", "sdfarm_swaps_total", "sdfarm_dataset_runs_total",
            "sdfarm_dataset_next_run_timestamp_seconds", "sdfarm_webhook_deliveries_total"} <= read
    assert read <= exported(), read - exported()
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Throughput (images/s)", "Queue depth (chunks)", "Failure rate", "Images/s per worker", "GPU memory",
            "Batch ETA", "Queue wait (p50, p95)", "LoRA/VAE swaps (per minute)", "Dataset runs (last 24h)",
            "Webhook deliveries (last hour)"} <= titles
