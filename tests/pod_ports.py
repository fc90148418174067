"""Where each container of a rendered pod listens, as its own arguments and environment decide.

The containers of a pod share one network namespace: two that listen on one port
collide, and the second to bind loses (the Cloud SQL Auth Proxy exits; the app
serves no metrics). Declared `ports` are informational to Kubernetes, so this reads
what each program would really do:
- the app: app.settings.load_settings over the container's environment (its
  ConfigMap and literal env), the same parser the server starts with;
- the Cloud SQL Auth Proxy: tests/cloud_sql_proxy.py, a model of the binary's flags,
  CSQL_PROXY_* environment and defaults;
- the migration (alembic), the backup (pg_dump), the restore (pg_restore) and
  `helm test` (curl): no listener.
Any other container is an error until it is modelled here.

Which containers run at once follows Kubernetes' sidecar order: a native sidecar (an
init container with restartPolicy Always) runs from its start to the pod's end; an
ordinary init container runs alone with the sidecars before it; then the main
containers with every sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests import cloud_sql_proxy


class UnknownContainer(Exception):
    pass


@dataclass(frozen=True)
class Port:
    container: str
    purpose: str
    host: str
    port: int


def environment(container: dict, config_maps: dict[str, dict]) -> dict[str, str]:
    """The literal environment a kubelet gives the container (Secrets left out)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        elif entry["name"].startswith(cloud_sql_proxy.ENV_PREFIX):
            raise UnknownContainer(f"{container['name']}: {entry['name']} is not a literal; "
                                   "where the proxy listens must be readable from the chart")
    return env


def is_proxy(container: dict) -> bool:
    repository = container["image"].split("@")[0].rsplit(":", 1)[0]
    return repository.rsplit("/", 1)[-1] in ("cloud-sql-proxy", "hello-birthday-cloud-sql-proxy")


def listeners(container: dict, app_image: str, config_maps: dict[str, dict]) -> list[Port]:
    name = container["name"]
    env = environment(container, config_maps)
    command = container.get("command") or []
    args = container.get("args") or []
    if is_proxy(container):
        # The image's entrypoint is the binary: a command replaces it, args follow.
        argv = command[1:] + args
        return [Port(name, found.purpose, found.host, found.port)
                for found in cloud_sql_proxy.listeners(argv, env)]
    if container["image"] == app_image and not command and not args:
        from app.settings import load_settings

        settings = load_settings({key: value for key, value in env.items()
                                  if key != "DATABASE_URL"})
        found = [Port(name, "http", settings.host, settings.port)]
        if settings.metrics_port:
            found.append(Port(name, "metrics", settings.host, settings.metrics_port))
        return found
    if container["image"] == app_image and command[:1] == ["alembic"]:
        return []
    if name == "backup" and "pg_dump " in " ".join(command + args):
        return []  # the backup script: pg_dump and file housekeeping
    if name == "restore" and "pg_restore " in " ".join(command + args):
        return []  # the restore script: pg_restore of one dump
    if container["image"].rsplit("/", 1)[-1].startswith("curl:"):
        return []  # helm test's one request
    raise UnknownContainer(f"no listener model for container {name} ({container['image']}): "
                           "add one to tests/pod_ports.py")


def phases(spec: dict) -> list[list[dict]]:
    """The sets of containers that run at the same time, in the order a kubelet starts them."""
    sidecars: list[dict] = []
    found = []
    for container in spec.get("initContainers", []):
        if container.get("restartPolicy") == "Always":
            sidecars.append(container)
            found.append(list(sidecars))
        else:
            found.append([*sidecars, container])
    found.append([*sidecars, *spec["containers"]])
    return found


def collisions(spec: dict, app_image: str, config_maps: dict[str, dict]) -> list[str]:
    """Every port that two listeners of one phase of the pod would both bind."""
    problems = []
    for phase in phases(spec):
        by_port: dict[int, list[Port]] = {}
        for container in phase:
            for port in listeners(container, app_image, config_maps):
                by_port.setdefault(port.port, []).append(port)
        for number, ports in sorted(by_port.items()):
            if len(ports) > 1:
                who = ", ".join(f"{p.container} ({p.purpose} on {p.host})" for p in ports)
                problem = f"port {number}: {who}"
                if problem not in problems:
                    problems.append(problem)
    return problems


def undeclared(spec: dict, app_image: str, config_maps: dict[str, dict]) -> list[str]:
    """Declared container ports that the container does not listen on (a probe or a
    scraper sent there reaches someone else, or no one)."""
    problems = []
    for container in spec.get("initContainers", []) + spec["containers"]:
        heard = {port.port for port in listeners(container, app_image, config_maps)}
        for declared in container.get("ports", []):
            if declared["containerPort"] not in heard:
                problems.append(f"{container['name']} declares {declared['containerPort']} "
                                f"({declared.get('name')}) but listens on {sorted(heard)}")
    return problems
