"""The shipped dashboard and rules name only metrics the server exports."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Running, require_tool
from tests.test_metrics import produce_traffic
from tests.test_service import run_request

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "pt2serve-dashboard.json"
RULES = ROOT / "deploy" / "prometheus"
METRIC = re.compile(r"\b((?:pt2serve|grpc_server|process)_[a-z_]+)\b")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


async def exported_names(running: Running) -> set[str]:
    """Every family and sample name /metrics shows."""
    names = set()
    for family in text_string_to_metric_families(await running.exposition()):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def queries(node: object) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            else:
                found += queries(value)
    elif isinstance(node, list):
        for item in node:
            found += queries(item)
    return found


def referenced_metrics(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC.findall(e) if not m.endswith("_")}


async def test_dashboard_queries_name_exported_metrics(running: Running) -> None:
    await produce_traffic(running)
    await running.inference.Run(run_request("demo", x=torch.randn(1, 16)))
    exported = await exported_names(running)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = queries(dashboard)
    assert len(exprs) >= 10
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
    missing = sorted(m for m in referenced_metrics(exprs) if m not in exported)
    assert not missing, missing


async def test_rules_name_exported_metrics(running: Running) -> None:
    await produce_traffic(running)
    exported = await exported_names(running)
    text = (RULES / "pt2serve-rules.yml").read_text()
    exprs = re.findall(r"expr: (.*(?:\n {10}.*)*)", text)
    assert len(exprs) >= 12
    missing = sorted(m for m in referenced_metrics(exprs) if m not in exported)
    assert not missing, missing


def test_the_reference_check_catches_a_typo() -> None:
    assert referenced_metrics(["rate(pt2serve_inference_requestz_total[1m])"]) == {
        "pt2serve_inference_requestz_total"
    }


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = require_tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", "pt2serve-rules.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(
        [promtool, "test", "rules", "pt2serve-rules.test.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_every_dashboard_series_is_filtered_to_pt2serve() -> None:
    """Other services export the same standard names (grpc_server_*, process_*): every
    selector of the dashboard narrows to the chosen models or the pt2serve job."""
    selector = re.compile(r"\b((?:pt2serve|grpc_server|process)_[a-z_]+)(\{[^}]*\})?")
    unfiltered = []
    for expr in queries(json.loads(DASHBOARD.read_text())):
        for name, labels in selector.findall(expr):
            if name.startswith("pt2serve_") and 'model=~"$model"' in labels:
                continue
            if 'job=~"$job"' in labels and (
                not name.startswith("grpc_server_") or "grpc_service=~" in labels
            ):
                continue
            unfiltered.append(f"{name}{labels}")
    assert not unfiltered, unfiltered
