"""`nox -s container`: build the image with buildah and run it against PostgreSQL.

Registries other than PyPI and Debian's cannot be reached from the build
machines, so when the base image named in the Dockerfile cannot be pulled, a
Debian root filesystem of the base's release, made with debootstrap (python3, python3-venv)
is imported under that name and the build runs with --pull-never. It says so
loudly. CircleCI builds the real thing with docker and the real base.

Checks: the migration command, then the server: /readyz 200, a PUT/GET round
trip, the process is not root, the root filesystem is read-only (only /tmp is
writable), and SIGTERM stops it with exit code 0. Prints the image size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import httpx2 as httpx

from tests.conftest import DEFAULT_TEST_DATABASE_URL, ROOT, PostgresServer
from tests.live_server import NotReady, free_port, get_when_up, wait_ready

IMAGE = "localhost/hello-birthday:smoke"
# podman/buildah here (no Docker engine on the build machines); docker on CircleCI.
DOCKER = os.environ.get("CONTAINER_ENGINE", "podman") == "docker"
STORAGE = ["--storage-driver", "vfs"]
PODMAN = ["docker"] if DOCKER else ["podman", *STORAGE, "--runtime", "runc"]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def run(*args: str, check: bool = True, capture: bool = False, **kwargs):
    print("+", " ".join(args), flush=True)
    return subprocess.run(args, check=check, text=True,
                          capture_output=capture, **kwargs)


def base_image() -> str:
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert match, "the Dockerfile names its base in ARG PYTHON_IMAGE"
    return match.group(1)


def base_suite(base: str) -> str:
    """The Debian release the base is built on (python:3.13.9-slim-trixie: trixie):
    the stand-in is made from the same release, so it has the same Python minor."""
    match = re.search(r"-(bookworm|trixie)$", base.split("@")[0])
    assert match, f"the base {base} names its Debian release (…-slim-trixie)"
    return match.group(1)


def ensure_engine() -> None:
    if DOCKER:
        if not shutil.which("docker"):
            sys.exit("container: FAILED: CONTAINER_ENGINE=docker but docker is not installed")
        return
    missing = [tool for tool in ("podman", "buildah") if not shutil.which(tool)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # Under noxfile.APT_LOCK: other sessions may be running apt-get beside this one.
        apt = ("flock", "/var/lock/hello-birthday-apt", "apt-get", "-o", "DPkg::Lock::Timeout=600")
        run(*apt, "update", "-qq", env=apt_env)  # a fresh machine's lists may be stale
        run(*apt, "install", "-y", "-qq", "podman", "buildah", "runc", "debootstrap", env=apt_env)
        missing = [tool for tool in ("podman", "buildah") if not shutil.which(tool)]
    if missing:
        sys.exit(f"container: FAILED: no container engine ({', '.join(missing)} missing) and "
                 "none could be installed; this check cannot pass without one")


def ensure_base(name: str) -> bool:
    """Make the base image available; True when it is the debootstrap stand-in."""
    inspected = run(*PODMAN, "image", "inspect", "--format", "{{json .Labels}}", name,
                    check=False, capture=True)
    if inspected.returncode == 0:
        return "hello-birthday.stand-in" in inspected.stdout
    pulled = run(*PODMAN, "pull", "--quiet", name, check=False, capture=True)
    if pulled.returncode == 0:
        return False
    suite = base_suite(name)
    print(f"\n*** {name} cannot be pulled here: building a STAND-IN base from Debian "
          f"{suite} (debootstrap, python3, python3-venv). The real base is built on "
          "CircleCI. ***\n", flush=True)
    rootfs = ROOT / ".tools" / f"rootfs-{suite}"
    if not (rootfs / "usr" / "bin" / "python3").exists():
        if not shutil.which("debootstrap"):
            sys.exit("container: FAILED: the base cannot be pulled and debootstrap, which "
                     "would make a stand-in, is not installed")
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.parent.mkdir(exist_ok=True)
        run("debootstrap", "--variant=minbase", "--include=python3,python3-venv", suite,
            str(rootfs), "http://deb.debian.org/debian")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(*PODMAN, "import", "--change", "CMD [\"/bin/bash\"]", "--change",
        f"LABEL hello-birthday.stand-in=debootstrap-{suite}", "-", name, stdin=tar.stdout)
    tar.wait()
    return True


def build(base: str) -> None:
    revision = run("git", "rev-parse", "HEAD", capture=True, check=False).stdout.strip()
    # CircleCI builds the image it will push here, once: the digest-pinned base
    # (PYTHON_IMAGE) and its release tag (IMAGE_VERSION); the job saves it.
    version = os.environ.get("IMAGE_VERSION", "smoke")
    if DOCKER:
        pinned = os.environ.get("PYTHON_IMAGE")
        run("docker", "build", *(["--build-arg", f"PYTHON_IMAGE={pinned}"] if pinned else []),
            "--build-arg", f"VERSION={version}",
            "--build-arg", f"REVISION={revision or 'unknown'}", "-t", IMAGE, str(ROOT))
        return
    # No layer cache: buildah 1.28 (Debian 12's) keys a cached LABEL or ENV step by its
    # text, not by the build-arg values in it, so an image built from unchanged sources
    # kept an earlier commit's REVISION, and the revision check below failed on it.
    run("buildah", *STORAGE, "bud", "--isolation", "chroot", "--pull-never", "--no-cache",
        "--network", "host", "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
        "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", f"VERSION={version}",
        "--build-arg", f"REVISION={revision or 'unknown'}", "-t", IMAGE, str(ROOT))


def container_run(*args: str, **kwargs):
    return run(*PODMAN, "run", "--network", "host", "--read-only", "--tmpfs", "/tmp",
               "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", *args, **kwargs)


def main() -> int:
    ensure_engine()
    base = base_image()
    stand_in = False if DOCKER else ensure_base(base)
    if stand_in:
        print(f"*** building on the STAND-IN for {base} (debootstrap {base_suite(base)}) ***",
              flush=True)
    build(base)
    size = int(run(*PODMAN, "image", "inspect", "--format", "{{.Size}}", IMAGE,
                   capture=True).stdout.strip())
    labels = json.loads(run(*PODMAN, "image", "inspect", "--format", "{{json .Labels}}", IMAGE,
                            capture=True).stdout)
    assert labels["org.opencontainers.image.version"] == "smoke", labels
    assert labels["org.opencontainers.image.revision"], labels

    from app.settings import normalise_database_url

    server = PostgresServer(normalise_database_url(
        os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)))
    database_url = server.create_database().replace("postgresql+psycopg://", "postgresql://")
    name = f"hello-birthday-smoke-{os.getpid()}"
    port = free_port()
    metrics_port = free_port()
    revision = run("git", "rev-parse", "HEAD", capture=True, check=False).stdout.strip()
    try:
        container_run("--rm", "-e", f"DATABASE_URL={database_url}", IMAGE,
                      "alembic", "upgrade", "head")
        container_run("-d", "--name", name, "-e", f"DATABASE_URL={database_url}",
                      "-e", f"PORT={port}", "-e", "HOST=127.0.0.1",
                      "-e", f"METRICS_PORT={metrics_port}",
                      "-e", "SHUTDOWN_DRAIN_SECONDS=1", IMAGE)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, 60, interval=0.5)
        except NotReady:
            run(*PODMAN, "logs", name, check=False)
            raise
        put = httpx.put(url + "/hello/Container", json={"dateOfBirth": "1990-01-01"})
        assert put.status_code == 204, put.text
        greeting = httpx.get(url + "/hello/Container").json()["message"]
        assert greeting.startswith("Hello, Container!"), greeting
        # The build's revision, baked in at build time, on the metrics port.
        scraped = get_when_up(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert f'revision="{revision or "unknown"}"' in scraped, scraped[:500]

        uid = run(*PODMAN, "exec", name, "python", "-c", "import os; print(os.getuid())",
                  capture=True).stdout.strip()
        assert uid == "10001", f"runs as uid {uid}"
        denied = run(*PODMAN, "exec", name, "python", "-c", "open('/srv/x', 'w')",
                     check=False, capture=True)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        run(*PODMAN, "exec", name, "python", "-c", "open('/tmp/x', 'w').write('ok')")

        run(*PODMAN, "stop", "--time", "20", name)  # SIGTERM, SIGKILL only after 20 s
        state = json.loads(run(*PODMAN, "inspect", "--format", "{{json .State}}", name,
                               capture=True).stdout)
        logs = run(*PODMAN, "logs", name, capture=True).stdout
        assert state["ExitCode"] == 0, state
        assert "hello-birthday stopped" in logs
    finally:
        run(*PODMAN, "rm", "--force", name, check=False, capture=True)
        server.drop_all()
    print(f"\ncontainer: OK; image {IMAGE} is {size / 1e6:.0f} MB on base {base}"
          f"{' (the debootstrap STAND-IN, not the real base)' if stand_in else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
