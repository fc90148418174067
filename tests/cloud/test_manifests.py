"""cloudrun/*.yaml through gcloud's own parser (its API messages), offline; the
shipped files pass it in every scenario of test_deploy.py (replaced through the
stand-in), and each misspelling here fails before any request."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.cloud.standin import which_gcloud
from tests.test_cloudrun import rendered_text


def rendered(name: str, tmp_path, edit=lambda text: text) -> str:
    target = tmp_path / name
    target.write_text(edit(rendered_text(name)))
    return str(target)


def replace(kind: str, path: str, tmp_path) -> subprocess.CompletedProcess:
    """`gcloud run services|jobs replace` with no endpoint to reach (a network
    namespace with nothing listening): parsing comes first."""
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
           "CLOUDSDK_AUTH_ACCESS_TOKEN": "offline", "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
           "CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN": "http://run.local.test:9/"}
    return subprocess.run([which_gcloud(), "--project=p", "--quiet", "run", kind, "replace",
                           path, "--region=europe-west1"],
                          env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("kind, name, field", [
    ("services", "service.yaml", "containers:"), ("jobs", "migrate-job.yaml", "containers:"),
    ("services", "service.yaml", "startupProbe:"), ("jobs", "migrate-job.yaml", "startupProbe:")])
def test_gclouds_parser_refuses_a_misspelled_field(kind, name, field, tmp_path):
    bad = replace(kind, rendered(name, tmp_path, lambda t: t.replace(
        field, field[:-2] + "z:", 1)), tmp_path)
    assert bad.returncode != 0 and "Failed to parse" in bad.stderr, bad.stderr
