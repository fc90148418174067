"""What the stand-in runs: network namespaces (a Cloud Run instance's own
localhost), PostgreSQL clusters (a Cloud SQL instance's server) and the
containers of an instance, real or modelled (tests/cloud/README.md).

Needs root: `nox -s cloudrun` runs in a private network namespace, where each
instance gets a namespace of its own (unshare --net) and PostgreSQL runs as the
postgres OS user.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class Netns:
    """A network namespace with its loopback up: one Cloud Run instance's
    network, shared by its containers ("containers in an instance share the
    network namespace": https://cloud.google.com/run/docs/deploying#sidecars).

    Sockets are created in it from a thread that joined it (a thread's network
    namespace is its own under Linux); processes join it before exec."""

    def __init__(self) -> None:
        holder = subprocess.Popen(["unshare", "--net", "--", "sh", "-c",
                                   "ip link set lo up && exec sleep 86400"])
        deadline = time.monotonic() + 10
        while Path(f"/proc/{holder.pid}/comm").read_text().strip() != "sleep":
            if holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("cannot create a network namespace (unshare --net)")
            time.sleep(0.01)
        self.fd = os.open(f"/proc/{holder.pid}/ns/net", os.O_RDONLY)
        holder.kill()  # the open descriptor keeps the namespace alive
        holder.wait()

    def enter(self) -> None:
        if _libc.setns(self.fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    def run(self, fn):
        """fn() in a thread inside the namespace; its result or its exception."""
        result: dict = {}

        def target() -> None:
            try:
                self.enter()
                result["value"] = fn()
            except BaseException as error:  # noqa: B902 - handed to the caller
                result["error"] = error
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def listen(self, host: str, port: int) -> socket.socket:
        return self.run(lambda: socket.create_server((host, port), backlog=64))

    def connect(self, port: int, timeout: float = 5) -> socket.socket:
        return self.run(lambda: socket.create_connection(("127.0.0.1", port), timeout=timeout))

    def http(self, method: str, port: int, path: str, body: bytes | None = None,
             headers: dict | None = None, timeout: float = 30):
        """One HTTP request to localhost:port inside the namespace: (status, headers, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.sock = self.connect(port, timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            reply = connection.getresponse()
            return reply.status, dict(reply.getheaders()), reply.read()
        finally:
            connection.close()

    def close(self) -> None:
        os.close(self.fd)


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL's server binaries are not installed (initdb)")
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_postgres(*command: str, **kwargs) -> subprocess.CompletedProcess:
    """pg_ctl and initdb refuse root: run them as the postgres OS user."""
    return subprocess.run(["runuser", "-u", "postgres", "--", *command],
                          capture_output=True, text=True, **kwargs)


# Cloud SQL's predefined roles (https://cloud.google.com/sql/docs/postgres/users:
# "The postgres user is part of the cloudsqlsuperuser role, and has the
# following attributes: CREATEROLE, CREATEDB, and LOGIN. It does not have the
# SUPERUSER or REPLICATION attributes"); the superuser is Cloud SQL's own.
CLOUDSQL_ROLES = """
CREATE ROLE cloudsqlsuperuser NOLOGIN CREATEROLE CREATEDB;
CREATE ROLE cloudsqliamserviceaccount NOLOGIN;
CREATE ROLE cloudsqliamuser NOLOGIN;
CREATE ROLE postgres LOGIN CREATEROLE CREATEDB IN ROLE cloudsqlsuperuser;
"""
SUPERUSER = "cloudsqladmin"


class PgCluster:
    """A Cloud SQL instance's PostgreSQL: a real cluster, reachable only by the
    stand-in (its proxy model, its backups and imports) on a loopback port."""

    _template: Path | None = None
    _template_lock = threading.Lock()
    _root = Path(tempfile.mkdtemp(prefix="standin-pg-"))
    atexit.register(shutil.rmtree, _root, True)

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(dir=self._root))
        shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        shutil.copytree(self.template(), self.data, symlinks=True)
        subprocess.run(["chown", "-R", "postgres:postgres", str(self.dir)], check=True)
        self.port = 0
        self.lock = threading.RLock()

    @classmethod
    def template(cls) -> Path:
        """initdb once per process, with Cloud SQL's roles; each instance copies it."""
        with cls._template_lock:
            if cls._template is None:
                os.chmod(cls._root, 0o755)
                shutil.chown(cls._root, "postgres")
                data = cls._root / "template"
                result = as_postgres(str(pg_bin() / "initdb"), "-D", str(data), "-U", SUPERUSER,
                                     "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
                if result.returncode:
                    raise RuntimeError(f"initdb failed: {result.stderr}")
                with open(data / "pg_hba.conf", "a") as hba:
                    hba.write("host replication all 127.0.0.1/32 trust\n")
                cluster = object.__new__(cls)
                cluster.data, cluster.port, cluster.lock = data, 0, threading.RLock()
                cluster.dir = cls._root
                cluster.start()
                cluster.psql(CLOUDSQL_ROLES)
                cluster.stop()
                cls._template = data
            return cls._template

    def start(self) -> None:
        with self.lock:
            self.port = free_port()
            options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                       "-c unix_socket_directories='' -c max_connections=100 -c fsync=off")
            result = as_postgres(str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-o", options,
                                 "-l", str(self.dir / "server.log"), "-w", "start")
            if result.returncode:
                raise RuntimeError(f"PostgreSQL did not start: {result.stdout}{result.stderr}"
                                   + (self.dir / "server.log").read_text()[-2000:])

    def stop(self) -> None:
        with self.lock:
            as_postgres(str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """A failover or a restart: every connection is cut, the server comes back."""
        self.stop()
        self.start()

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres", user: str = SUPERUSER,
             check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(pg_bin() / "psql"), "-X", "-q", "-A", "-t",
                                 "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
                                 "-U", user, "-d", database],
                                input=sql, capture_output=True, text=True, timeout=120)
        if check and result.returncode:
            raise RuntimeError(f"psql as {user}: {result.stderr}")
        return result

    def backup(self, target: Path) -> subprocess.CompletedProcess:
        """A whole-instance backup, taken online (pg_basebackup)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(target.parent, "postgres")
        return as_postgres(str(pg_bin() / "pg_basebackup"), "-h", "127.0.0.1",
                           "-p", str(self.port), "-U", SUPERUSER, "-D", str(target),
                           "-X", "stream", "--checkpoint=fast", timeout=300)

    def restore(self, source: Path) -> None:
        """Overwrite the instance with a backup: the server restarts."""
        with self.lock:
            self.stop()
            shutil.rmtree(self.data)
            shutil.copytree(source, self.data, symlinks=True)
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.data)], check=True)
            self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the PostgreSQL wire protocol, as much as a proxy reads --------------------------------

SSL_REQUEST, GSSENC_REQUEST, PROTOCOL_3 = 80877103, 80877104, 196608


def read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_startup(sock: socket.socket) -> tuple[bytes, dict[str, str]]:
    """The client's StartupMessage (answering SSL and GSS requests with 'N', as the
    Auth Proxy's local listener does: it speaks plain TCP to its clients)."""
    while True:
        length, code = struct.unpack("!ii", read_exact(sock, 8))
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            sock.sendall(b"N")
            continue
        body = read_exact(sock, length - 8)
        if code != PROTOCOL_3:
            raise ConnectionError(f"unsupported protocol {code}")
        parts = body.split(b"\0")
        params = {parts[i].decode(): parts[i + 1].decode()
                  for i in range(0, len(parts) - 1, 2) if parts[i]}
        return struct.pack("!ii", length, code) + body, params


def error_response(message: str, code: str = "28000") -> bytes:
    fields = b"SFATAL\0VFATAL\0C" + code.encode() + b"\0M" + message.encode() + b"\0\0"
    return b"E" + struct.pack("!i", len(fields) + 4) + fields


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes."""
    def copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    threading.Thread(target=copy, args=(b, a), daemon=True).start()
    copy(a, b)
    a.close()
    b.close()


# --- the Cloud SQL Auth Proxy, modelled --------------------------------------------------

class ContainerExit(Exception):
    """A container that stops at start: its message is the revision's."""


PROXY_SOURCE = "GoogleCloudPlatform/cloud-sql-proxy cmd/root.go (v2)"


def parse_proxy_args(args: list[str]) -> dict:
    """The flags the project uses, with the proxy's defaults (PROXY_SOURCE: --address
    127.0.0.1, --port 5432 for the first PostgreSQL instance, --http-address localhost,
    --http-port 9090, --admin-port 9091); an unknown flag stops the proxy, as cobra does."""
    conf = {"address": "127.0.0.1", "port": 0, "auto_iam_authn": False, "private_ip": False,
            "health_check": False, "prometheus": False, "http_address": "localhost",
            "http_port": 9090, "quitquitquit": False, "admin_port": 9091,
            "exit_zero_on_sigterm": False, "instances": []}
    booleans = {"--auto-iam-authn": "auto_iam_authn", "-i": "auto_iam_authn",
                "--private-ip": "private_ip", "--health-check": "health_check",
                "--prometheus": "prometheus", "--quitquitquit": "quitquitquit",
                "--exit-zero-on-sigterm": "exit_zero_on_sigterm", "--structured-logs": None,
                "--lazy-refresh": None, "--debug-logs": None, "--quiet": None}
    values = {"--address": "address", "-a": "address", "--port": "port", "-p": "port",
              "--http-address": "http_address", "--http-port": "http_port",
              "--admin-port": "admin_port", "--max-sigterm-delay": None,
              "--min-sigterm-delay": None}
    queue = list(args)
    while queue:
        arg = queue.pop(0)
        name, _, value = arg.partition("=")
        if name in booleans:
            if booleans[name]:
                conf[booleans[name]] = value.lower() not in ("false", "f", "0") if value else True
        elif name in values:
            if not value:
                value = queue.pop(0)
            if values[name]:
                conf[values[name]] = int(value) if values[name].endswith("port") else value
        elif arg.startswith("-"):
            raise ContainerExit(f"Error: unknown flag: {name}")
        else:
            connection, _, query = arg.partition("?")
            options = dict(part.partition("=")[::2] for part in query.split("&") if part)
            conf["instances"].append((connection, options))
    if not conf["instances"]:
        raise ContainerExit("Error: missing instance_connection_name "
                            "(e.g. project:region:instance)")
    return conf


class ProxyModel:
    """The Cloud SQL Auth Proxy v2 in one instance: listens where its arguments
    say, inside the instance's namespace; each connection is checked as Cloud SQL
    checks it, then piped to the instance's PostgreSQL.

    The checks, with their sources:
    - the caller needs cloudsql.instances.connect (roles/cloudsql.client):
      https://cloud.google.com/sql/docs/postgres/connect-auth-proxy#prerequisites
    - private IP: the instance must have one, and the instance's network must
      reach it (Direct VPC egress on that VPC); otherwise the dial times out
      ("dial tcp 10.x.x.x:3307: connect: connection timed out",
      GoogleCloudPlatform/cloud-sql-proxy#164). Public IP: the instance must have one.
    - --auto-iam-authn: the instance's cloudsql.iam_authentication flag on, the
      login user the caller's IAM user (a service account's email without
      ".gserviceaccount.com"), created on the instance, and the caller granted
      roles/cloudsql.instanceUser:
      https://cloud.google.com/sql/docs/postgres/iam-logins and add-manage-iam-users
    """

    def __init__(self, cloud, netns: Netns, container: dict, account: str,
                 egress_network: str | None) -> None:
        self.cloud, self.netns, self.account = cloud, netns, account
        self.egress_network = egress_network
        self.conf = parse_proxy_args([*container.get("command", [])[1:],
                                      *container.get("args", [])])
        self.listeners: list[socket.socket] = []
        self.exited: int | None = None
        self.servers: list = []

    def start(self) -> None:
        port = self.conf["port"] or 5432
        try:
            for connection, options in self.conf["instances"]:
                port = int(options.get("port", port))
                address = options.get("address", self.conf["address"])
                sock = self.netns.listen(address, port)
                self.listeners.append(sock)
                threading.Thread(target=self._accept, args=(sock, connection, options),
                                 daemon=True).start()
                port += 1
            if self.conf["health_check"] or self.conf["prometheus"]:
                host = self.conf["http_address"]
                self._http(host if host != "localhost" else "127.0.0.1",
                           self.conf["http_port"], self._health)
            if self.conf["quitquitquit"]:
                self._http("127.0.0.1", self.conf["admin_port"], self._admin)
        except OSError as error:
            self.stop()
            raise ContainerExit(f"listen tcp: bind: {error.strerror}") from error

    def _http(self, host: str, port: int, handler) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        model = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                return

            def _answer(self) -> None:
                status, body = handler(self.command, self.path)
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if self.path == "/quitquitquit" and status == 200:
                    threading.Thread(target=model.quit, daemon=True).start()

            do_GET = do_POST = _answer

        sock = self.netns.listen(host, port)
        server = ThreadingHTTPServer((host, port), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.daemon_threads = True
        self.servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def _health(self, method: str, path: str) -> tuple[int, bytes]:
        if path in ("/startup", "/liveness", "/readiness") and self.conf["health_check"]:
            return 200, b"ok"
        return 404, b"404 page not found\n"

    def _admin(self, method: str, path: str) -> tuple[int, bytes]:
        return (200, b"") if path == "/quitquitquit" else (404, b"404 page not found\n")

    def quit(self) -> None:
        """/quitquitquit: a clean exit, code 0 (PROXY_SOURCE: errQuitQuitQuit)."""
        self.stop()
        self.exited = 0
        self.cloud.event("proxy-exit", code=0)

    def stop(self) -> None:
        for sock in self.listeners:
            try:
                sock.close()
            except OSError:
                pass
        self.listeners = []
        for server in self.servers:
            server.shutdown()
            server.server_close()
        self.servers = []

    def _accept(self, listener: socket.socket, connection: str, options: dict) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, connection, options),
                             daemon=True).start()

    def _refuse(self, client: socket.socket, reason: str, message: bytes = b"") -> None:
        self.cloud.event("proxy-refused", account=self.account, reason=reason)
        try:
            if message:
                client.sendall(message)
        finally:
            client.close()

    def _serve(self, client: socket.socket, connection: str, options: dict) -> None:
        try:
            startup, params = read_startup(client)
        except (ConnectionError, OSError, struct.error):
            client.close()
            return
        private = options.get("private-ip", str(self.conf["private_ip"])).lower() \
            in ("true", "t", "")
        iam = options.get("auto-iam-authn", str(self.conf["auto_iam_authn"])).lower() \
            in ("true", "t", "")
        verdict = self.cloud.proxy_check(connection, self.account, private, iam,
                                         self.egress_network, params.get("user", ""))
        if verdict is not None:
            reason, message = verdict
            self._refuse(client, reason, error_response(message) if message else b"")
            return
        cluster = self.cloud.cluster_of(connection)
        try:
            upstream = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
            upstream.settimeout(None)
            upstream.sendall(startup)
        except OSError as error:
            self._refuse(client, f"upstream: {error}")
            return
        client.settimeout(None)
        pipe(client, upstream)


# --- the Managed Service for Prometheus sidecar, modelled --------------------------------

class CollectorModel:
    """Cloud Run's Managed Prometheus sidecar: reads its RunMonitoring from
    /etc/rungmp/config.yaml (a mounted secret) and scrapes localhost at each
    endpoint's port and path
    (https://cloud.google.com/stackdriver/docs/managed-prometheus/cloudrun-sidecar).
    Here a scrape is made on demand (Cloud.scrape) and recorded."""

    def __init__(self, cloud, netns: Netns, container: dict, files: dict[str, str]) -> None:
        self.cloud, self.netns = cloud, netns
        config_text = files.get("/etc/rungmp/config.yaml")
        self.endpoints = []
        if config_text is not None:
            import yaml
            config = yaml.safe_load(config_text)
            if (config.get("apiVersion"), config.get("kind")) != \
                    ("monitoring.googleapis.com/v1beta", "RunMonitoring"):
                raise ContainerExit("the RunMonitoring config is not a RunMonitoring")
            self.endpoints = config["spec"]["endpoints"]
        else:  # no config: the sidecar's default, localhost:8080/metrics
            self.endpoints = [{"port": "8080", "path": "/metrics"}]

    def start(self) -> None:
        return

    def scrape(self) -> list[dict]:
        results = []
        for endpoint in self.endpoints:
            port, path = int(endpoint["port"]), endpoint.get("path", "/metrics")
            try:
                status, _, body = self.netns.http("GET", port, path, timeout=10)
            except OSError as error:
                status, body = 0, str(error).encode()
            results.append({"port": port, "path": path, "status": status,
                            "text": body.decode(errors="replace")})
        return results

    def stop(self) -> None:
        return


# --- the app's image -----------------------------------------------------------------------

def image_env() -> dict[str, str]:
    """The runtime stage's ENV of the Dockerfile: what the image gives every container."""
    text = (ROOT / "Dockerfile").read_text()
    runtime = text.split("AS runtime", 1)[1]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", runtime, flags=re.M):
        for token in shlex.split(block.replace("\\\n", " ")):
            key, _, value = token.partition("=")
            if key != "PATH" and "$" not in value:
                env[key] = value
    return env


def json_annotation(template: dict, key: str, default):
    raw = template.get("metadata", {}).get("annotations", {}).get(key)
    return json.loads(raw) if raw else default
