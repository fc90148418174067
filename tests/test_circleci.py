"""The CircleCI pipeline agrees with the noxfile and ships only what passed the gates."""

from __future__ import annotations

import ast
import re

import pytest
import yaml

from tests.conftest import ROOT

CONFIG = yaml.safe_load((ROOT / ".circleci" / "config.yml").read_text())
RELEASE_JOBS = ("build-push", "approve-deploy", "deploy-cloudrun", "deploy-gke")


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
    return called


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
    for name in ("deploy-cloudrun", "deploy-gke"):
        assert "approve-deploy" in jobs[name]["requires"]


def test_image_tag_is_immutable_and_the_digest_is_recorded():
    commands = "\n".join(step["run"]["command"] for step in CONFIG["jobs"]["build-push"]["steps"]
                         if isinstance(step, dict) and isinstance(step.get("run"), dict))
    (tag,) = re.findall(r'tag="([^"]+)"', commands)
    assert "CIRCLE_SHA1" in tag and "<< pipeline.number >>" in tag and \
        "<< pipeline.git.branch >>" in tag
    assert ":latest" not in commands
    assert "RepoDigests" in commands and "image-digest" in commands


def test_deploys_use_the_digest():
    text = yaml.safe_dump(CONFIG["jobs"]["deploy-cloudrun"]) + \
        yaml.safe_dump(CONFIG["jobs"]["deploy-gke"])
    assert text.count("cat build/image-digest") == 2


@pytest.mark.parametrize("target", ["deploy-cloudrun", "deploy-gke"])
def test_each_deploy_target_is_a_pipeline_parameter(target):
    assert CONFIG["parameters"][target]["type"] == "boolean"
    steps = CONFIG["jobs"][target]["steps"]
    assert steps[0]["when"]["condition"] == f"<< pipeline.parameters.{target} >>"


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
    assert "--python << parameters.python >>" in str(job["steps"])
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


def test_deploys_are_serialised_in_pipeline_order():
    entries = {}
    for entry in CONFIG["workflows"]["gates-build-deploy"]["jobs"]:
        if isinstance(entry, dict):
            (name, config), = entry.items()
            entries[name] = config
    groups = {entries[job].get("serial-group") for job in ("deploy-cloudrun", "deploy-gke")}
    assert len(groups) == 1 and None not in groups
