"""Cloud Monitoring alerting policies from the one source of the alerting rules,
helm/hello-birthday/files/alerts.yaml: one policy per alert, its PromQL with every
recording rule written out in place (Cloud Monitoring evaluates alerting policies,
not recording rules), written to cloudrun/alert-policies/<alert>.json.

The policies query Managed Service for Prometheus, where the Cloud Run sidecar and
the GKE PodMonitoring both write, so one set of policies alerts for both targets;
cloudrun/setup.sh creates them with the notification channel (ALERT_EMAIL).

    python cloudrun/alert_policies.py          # rewrite the files
    python cloudrun/alert_policies.py --check  # fail if they differ from alerts.yaml

tests/cloud/test_alert_policies.py runs --check, parses each file into gcloud's
AlertPolicy message, and runs the inlined rules through promtool's unit tests.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "helm" / "hello-birthday" / "files" / "alerts.yaml"
OUT = ROOT / "cloudrun" / "alert-policies"
# The rules' severity label to Cloud Monitoring's policy severity.
SEVERITY = {"page": "CRITICAL", "ticket": "WARNING"}
PREFIX = "hello-birthday: "


def seconds(duration: str) -> str:
    """A Prometheus duration (1m, 10m, 1h) as a protobuf Duration string."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    total = sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhd])", duration))
    return f"{total}s"


def inline(expr: str, records: dict[str, str]) -> str:
    """Replace each recorded series by its own expression, in parentheses."""
    for name, body in records.items():
        pattern = rf"(?<![\w:]){re.escape(name)}(?![\w:])"
        expr = re.sub(pattern, lambda _m, b=body: "(" + " ".join(b.split()) + ")", expr)
    return " ".join(expr.split())


def documentation_text(text: str) -> str:
    """Prometheus template labels as Cloud Monitoring documentation variables."""
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", r"${metric.label.\1}", text)


def policies(rules_text: str) -> dict[str, dict]:
    groups = yaml.safe_load(rules_text)["groups"]
    records = {rule["record"]: rule["expr"] for group in groups for rule in group["rules"]
               if "record" in rule}
    out = {}
    for group in groups:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            labels = rule.get("labels", {})
            annotations = rule.get("annotations", {})
            condition = {
                "query": inline(rule["expr"], records),
                "duration": seconds(rule.get("for", "0s")),
                "evaluationInterval": seconds(group.get("interval", "1m")),
                "labels": labels,
                "ruleGroup": group["name"],
                "alertRule": rule["alert"],
                # The metrics exist only after the first deploy; setup runs before it.
                "disableMetricValidation": True,
            }
            out[rule["alert"]] = {
                "displayName": PREFIX + rule["alert"],
                "documentation": {
                    "subject": documentation_text(annotations.get("summary", rule["alert"])),
                    "content": documentation_text(annotations.get("description", "")),
                    "mimeType": "text/markdown",
                },
                "severity": SEVERITY[labels.get("severity", "ticket")],
                "userLabels": {"app": "hello-birthday",
                               **{k: v for k, v in labels.items() if k in ("severity", "slo")}},
                "combiner": "OR",
                "conditions": [{"displayName": rule["alert"],
                                "conditionPrometheusQueryLanguage": condition}],
                "alertStrategy": {"autoClose": "604800s"},
            }
    return out


def rendered() -> dict[str, str]:
    return {f"{name}.json": json.dumps(policy, indent=2) + "\n"
            for name, policy in policies(RULES.read_text()).items()}


def main(argv: list[str]) -> int:
    files = rendered()
    if "--check" in argv:
        present = {p.name: p.read_text() for p in OUT.glob("*.json")}
        if present != files:
            print("cloudrun/alert-policies/ differs from helm/hello-birthday/files/alerts.yaml: "
                  "run python cloudrun/alert_policies.py", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    for stale in OUT.glob("*.json"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
