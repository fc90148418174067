"""The alerting policies setup.sh creates (cloudrun/alert-policies/, generated from
helm/hello-birthday/files/alerts.yaml): in step with the rules, accepted by the
Cloud Monitoring API's message types through gcloud's own parser, and firing
exactly as the rules do, under promtool, with every recording rule written out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.cloud.standin import which_gcloud
from tests.conftest import ROOT
from tests.test_alerts import SCENARIOS, promtool

POLICIES = sorted((ROOT / "cloudrun" / "alert-policies").glob("*.json"))


def gcloud_python() -> tuple[str, Path]:
    sdk = Path(subprocess.run([which_gcloud(), "info", "--format=value(installation.sdk_root)"],
                              capture_output=True, text=True, check=True,
                              env={"CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
                                   "PATH": "/usr/bin:/bin"}).stdout.strip())
    bundled = sdk / "platform" / "bundledpythonunix" / "bin" / "python3"
    return str(bundled if bundled.exists() else shutil.which("python3")), sdk


def test_the_policies_are_generated_from_the_rules():
    result = subprocess.run([sys.executable, str(ROOT / "cloudrun" / "alert_policies.py"),
                             "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rules = yaml.safe_load((ROOT / "helm" / "hello-birthday" / "files" / "alerts.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {p.stem for p in POLICIES} == alerts


def test_gclouds_parser_takes_every_field_of_every_policy(tmp_path):
    python, sdk = gcloud_python()
    result = subprocess.run([python, str(ROOT / "tests" / "cloud" / "gcloud_parse.py"),
                             "alert-policy", *map(str, POLICIES)],
                            env={"PYTHONPATH": f"{sdk / 'lib'}:{sdk / 'lib' / 'third_party'}",
                                 "CLOUDSDK_CONFIG": str(tmp_path), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == len(POLICIES)
    for report in reports:
        assert report["error"] is None and report["unknown"] == [], report


def test_gclouds_parser_reports_a_misspelled_field(tmp_path):
    """The check above is really in the path: a typo is named."""
    bad = tmp_path / "bad.json"
    policy = json.loads(POLICIES[0].read_text())
    policy["conditions"][0]["conditionPrometheusQueryLanguage"]["evalutionInterval"] = "60s"
    bad.write_text(json.dumps(policy))
    python, sdk = gcloud_python()
    result = subprocess.run([python, str(ROOT / "tests" / "cloud" / "gcloud_parse.py"),
                             "alert-policy", str(bad)],
                            env={"PYTHONPATH": f"{sdk / 'lib'}:{sdk / 'lib' / 'third_party'}",
                                 "CLOUDSDK_CONFIG": str(tmp_path), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=120)
    (report,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert report["unknown"] == ["conditions[0].conditionPrometheusQueryLanguage."
                                 "evalutionInterval"]


def policy_rules(interval: str) -> dict:
    """The policies as one Prometheus rule file: each condition's PromQL, duration and
    labels; no recording rule (Cloud Monitoring evaluates none)."""
    rules = []
    for path in POLICIES:
        (condition,) = json.loads(path.read_text())["conditions"]
        promql = condition["conditionPrometheusQueryLanguage"]
        assert "hello_birthday:" not in promql["query"], "every recording rule is inlined"
        rules.append({"alert": promql["alertRule"], "expr": promql["query"],
                      "for": promql["duration"], "labels": promql["labels"]})
    return {"groups": [{"name": "policies", "interval": interval, "rules": rules}]}


def promtool_run(tmp_path: Path, name: str, scenarios: dict, interval: str) -> None:
    rules_file = tmp_path / f"{name}-rules.yaml"
    rules_file.write_text(yaml.safe_dump(policy_rules(interval), sort_keys=False))
    tests = []
    for title, (input_series, eval_time, firing) in scenarios.items():
        checks = [{"eval_time": eval_time, "alertname": path.stem,
                   "exp_alerts": [{"exp_labels": firing[path.stem]}]
                   if path.stem in firing else []} for path in POLICIES]
        tests.append({"name": title, "interval": "1m", "input_series": input_series,
                      "alert_rule_test": checks})
    spec = {"rule_files": [str(rules_file)], "evaluation_interval": interval, "tests": tests}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", str(tmp_path / f"{name}.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_policy_fires_as_its_rule_does(tmp_path):
    """The scenarios of tests/test_alerts.py against the policies' queries. The
    days-long ones are evaluated every 5 minutes instead of every minute (a fifth of
    promtool's work): their series feed only alerts without a `for`, so whether one
    fires at the scenario's instant depends on its expression at that instant."""
    conditions = [json.loads(p.read_text())["conditions"][0]["conditionPrometheusQueryLanguage"]
                  for p in POLICIES]
    long = {title: scenario for title, scenario in SCENARIOS.items()
            if scenario[1].endswith("d")}
    short = {title: scenario for title, scenario in SCENARIOS.items() if title not in long}
    fed = {item["series"].split("{")[0] for series, _, _ in long.values() for item in series}
    for condition in conditions:
        if any(name.removesuffix("_bucket").removesuffix("_count") in condition["query"]
               for name in fed):
            assert condition["duration"] == "0s", condition["alertRule"]
    promtool_run(tmp_path, "short", short, "1m")
    promtool_run(tmp_path, "long", long, "5m")
