"""The CircleCI pipeline agrees with the noxfile and ships only what passed the gates."""

from __future__ import annotations

import ast
import re

import pytest
import yaml

from tests.conftest import ROOT

CONFIG = yaml.safe_load((ROOT / ".circleci" / "config.yml").read_text())
RELEASE_JOBS = ("build-push", "approve-deploy", "deploy")
TARGETS = ("deploy-cloudrun", "deploy-gke")


def noxfile_constant(name: str):
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    (value,) = [ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name]
    return value


def nox_sessions() -> tuple[set[str], list[str]]:
    """Session names and the GATES list, read from noxfile.py without importing nox."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    names, gates = set(), []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                call = decorator if isinstance(decorator, ast.Call) else None
                target = call.func if call else decorator
                if isinstance(target, ast.Attribute) and target.attr == "session":
                    name = node.name
                    for keyword in (call.keywords if call else []):
                        if keyword.arg == "name":
                            name = ast.literal_eval(keyword.value)
                    names.add(name)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "GATES":
            gates = ast.literal_eval(node.value)
    return names, gates


def called_sessions() -> set[str]:
    text = (ROOT / ".circleci" / "config.yml").read_text()
    called = set(re.findall(r"nox[^\n]*?-s ([\w-]+)", text))
    for job in CONFIG["jobs"].values():
        for step in _steps(job.get("steps", [])):
            if isinstance(step, dict) and "nox" in step:
                called.add(step["nox"]["session"])
    called.discard("<<")  # the nox command's own parameterised line
    # tests-<< parameters.python >>: nox's name of the tests session on one Python
    return {name.removesuffix("-") for name in called}


def _steps(steps):
    for step in steps:
        yield step
        if isinstance(step, dict):
            for key in ("when", "unless"):
                if key in step:
                    yield from _steps(step[key]["steps"])


def workflow_jobs() -> dict[str, dict]:
    (workflow,) = CONFIG["workflows"].values()
    jobs = {}
    for entry in workflow["jobs"]:
        if isinstance(entry, str):
            jobs[entry] = {}
        else:
            (name, options), = entry.items()
            jobs[name] = options
    return jobs


def test_every_session_the_config_calls_exists():
    names, _ = nox_sessions()
    assert called_sessions() - names == set()


def test_every_gate_session_is_called_and_required_before_release():
    _, gates = nox_sessions()
    assert gates, "noxfile.py declares its gates in GATES"
    assert set(gates) <= called_sessions()
    requires = set(workflow_jobs()["build-push"]["requires"])
    assert set(gates) <= requires


def test_gates_run_on_every_branch():
    jobs = workflow_jobs()
    _, gates = nox_sessions()
    for gate in gates:
        assert "filters" not in jobs[gate], f"{gate} must run on every branch"


def test_release_jobs_run_on_main_only():
    jobs = workflow_jobs()
    for name in RELEASE_JOBS:
        assert jobs[name]["filters"] == {"branches": {"only": "main"}}, name


def test_deploys_wait_for_the_manual_approval():
    jobs = workflow_jobs()
    assert jobs["approve-deploy"]["type"] == "approval"
    assert jobs["approve-deploy"]["requires"] == ["build-push"]
    assert jobs["deploy"]["requires"] == ["approve-deploy"]


def test_image_tag_is_immutable_and_the_digest_is_recorded():
    commands = "\n".join(step["run"]["command"] for step in CONFIG["jobs"]["build-push"]["steps"]
                         if isinstance(step, dict) and isinstance(step.get("run"), dict))
    (tag,) = re.findall(r'tag="([^"]+)"', commands)
    assert "CIRCLE_SHA1" in tag and "<< pipeline.number >>" in tag and \
        "<< pipeline.git.branch >>" in tag
    assert ":latest" not in commands
    assert "RepoDigests" in commands and "image-digest" in commands


def test_deploys_use_the_digest():
    text = yaml.safe_dump(CONFIG["jobs"]["deploy"])
    assert text.count('IMAGE="$(cat build/image-digest)" nox') == 2


@pytest.mark.parametrize("target", TARGETS)
def test_each_deploy_target_is_a_pipeline_parameter_and_a_skip_says_so(target):
    """A target switched off is visible: its step is named NOT DEPLOYED, and the
    job's artefact build/deployed.txt says so."""
    assert CONFIG["parameters"][target]["type"] == "boolean"
    condition = f"<< pipeline.parameters.{target} >>"
    steps = CONFIG["jobs"]["deploy"]["steps"]
    (when,) = [s["when"] for s in steps if isinstance(s, dict) and "when" in s
               and s["when"]["condition"] == condition]
    assert f"nox --non-interactive -s {target}" in yaml.safe_dump(when)
    (unless,) = [s["unless"] for s in steps if isinstance(s, dict) and "unless" in s
                 and s["unless"]["condition"] == condition]
    (skip,) = unless["steps"]
    assert "NOT DEPLOYED" in skip["run"]["name"] and "build/deployed.txt" in \
        skip["run"]["command"]
    assert {"store_artifacts": {"path": "build/deployed.txt"}} in steps


def test_tests_job_has_postgres_runs_every_python_and_stores_results():
    import ast

    job = CONFIG["jobs"]["tests"]
    executor = job["executor"]
    name = executor["name"] if isinstance(executor, dict) else executor
    assert CONFIG["executors"][name]["docker"][1]["image"].startswith("cimg/postgres")
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    (pythons,) = [ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", "") == "PYTHONS"]
    assert workflow_jobs()["tests"]["matrix"]["parameters"]["python"] == pythons
    assert "nox --non-interactive -s tests-<< parameters.python >>" in str(job["steps"])
    steps = job["steps"]
    assert any("store_test_results" in s for s in steps if isinstance(s, dict))
    assert any("store_artifacts" in s for s in steps if isinstance(s, dict))


def test_caches_are_keyed_on_the_lock_files_and_no_secret_is_inline():
    text = (ROOT / ".circleci" / "config.yml").read_text()
    assert 'checksum "/tmp/locks.sha256"' in text and "requirements/*.txt" in text
    assert not re.search(r"(?i)(password|secret|token|private_key)\s*[:=]\s*\S", text)


def job_commands(name: str) -> str:
    return "\n".join(str(step["run"]["command"] if isinstance(step.get("run"), dict)
                         else step.get("run", ""))
                     for step in CONFIG["jobs"][name]["steps"] if isinstance(step, dict))


def test_the_pushed_image_is_the_tested_one_never_a_rebuild():
    assert "docker build" not in job_commands("build-push")
    assert "docker load" in job_commands("build-push")
    assert "docker save" in job_commands("container")
    persisted = [step["persist_to_workspace"] for step in CONFIG["jobs"]["container"]["steps"]
                 if isinstance(step, dict) and "persist_to_workspace" in step]
    assert persisted and "image.tar" in persisted[0]["paths"]
    # Built on the base the Dockerfile names, resolved to a digest first.
    commands = job_commands("container")
    assert "RepoDigests" in commands and "export PYTHON_IMAGE=" in commands
    assert commands.index("PYTHON_IMAGE") < commands.index("nox --non-interactive -s container")


def test_one_serial_group_holds_every_deploy():
    """CircleCI: identical serial-group keys twice in one workflow queue
    unpredictably; so one job, holding both targets, holds the group."""
    grouped = {name: job["serial-group"] for name, job in workflow_jobs().items()
               if "serial-group" in job}
    assert grouped == {"deploy": "<< pipeline.project.slug >>/deploy"}


def test_gcloud_is_the_release_the_stand_in_tests_run():
    """Every install of gcloud names the pinned release, noxfile.py's GCLOUD_VERSION,
    which `nox -s cloudrun` checks against the installed gcloud."""
    assert CONFIG["parameters"]["gcloud-version"]["default"] == noxfile_constant("GCLOUD_VERSION")
    text = (ROOT / ".circleci" / "config.yml").read_text()
    uses = re.findall(r"- gcp-cli/(install|setup)(:?)\n((?:\s{8,}.*\n)*)", text)
    assert uses and all(colon and "version: << pipeline.parameters.gcloud-version >>" in body
                        for _, colon, body in uses), uses


def test_the_tests_run_on_productions_postgresql_major():
    setup = (ROOT / "cloudrun" / "setup.sh").read_text()
    (production,) = re.findall(r"--database-version=POSTGRES_(\d+)", setup)
    text = (ROOT / ".circleci" / "config.yml").read_text()
    images = re.findall(r"\b(?:cimg/)?postgres:(\d+)\.\d+", text)
    assert images and set(images) == {production}, images


@pytest.mark.parametrize("job", ["audit", "safety"])
def test_the_vulnerability_gates_are_hard_on_circleci(job):
    assert CONFIG["jobs"][job]["environment"]["AUDIT_REQUIRED"] == "1"


def test_the_readmes_session_table_names_every_nox_session():
    names, _ = nox_sessions()
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\| `([^`|]+)`(?:, `([^`|]+)`)? \|", readme, re.MULTILINE))
    listed = {name for row in rows for name in row if name}
    assert names - listed == set()
