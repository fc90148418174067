"""A stand-in for the Cloud SQL Auth Proxy v2 (gcr.io/cloud-sql-connectors/cloud-sql-proxy).

Two uses: `listeners(args, env)` says where the real binary listens for a container's
arguments and environment (tests/test_helm.py's port rule); run as a program it is the
proxy container of `nox -s gke-local`, listening exactly there and forwarding each
instance's connections to a local PostgreSQL. Standard library only: it runs in a bare
Python image.

Modelled on GoogleCloudPlatform/cloud-sql-proxy at tag v2.25.3 (MODELLED_VERSION; the
chart's image tag must equal it, tests/test_helm.py checks):
- flags, shorthands and defaults: cmd/root.go 508-624 (pflag/cobra syntax: --name=value,
  --name value, -p 5432, -p5432, bools bare or =value; an unknown flag is an error);
  environment CSQL_PROXY_<FLAG> for every flag not given (cmd/root.go 438, 726-727, viper
  AutomaticEnv, empty values ignored), instances from CSQL_PROXY_INSTANCE_CONNECTION_NAME[_N]
  when no argument names one;
- the database listeners: --address (127.0.0.1) and --port, else per engine from 5432 for
  PostgreSQL, each further instance one higher; ?address= and ?port= per instance win
  (internal/proxy/proxy.go 500-535, 888-905; cmd/root.go parseConfig's query parameters);
- the HTTP server (/startup, /readiness, /liveness; /metrics with --prometheus) on
  --http-address (localhost) : --http-port (9090), started only with --health-check or
  --prometheus, after the database listeners (cmd/root.go 556-558, 1179-1210);
- the admin server on localhost : --admin-port (9091), only with --debug or --quitquitquit
  (cmd/root.go 560-564, 1217-1240);
- a listener that cannot bind ends the process: "failed to start HTTP server" (cmd/root.go
  1299) or "Unable to mount socket", exit 1; SIGTERM exits 143, or 0 with
  --exit-zero-on-sigterm, after --min-sigterm-delay (cmd/errors.go).
What the stand-in does not model it refuses (NotModelled), never ignores: Unix sockets,
FUSE, a config file, subcommands. The instance's engine is PostgreSQL (Cloud SQL's
POSTGRES_16 from cloudrun/setup.sh); the real binary asks the SQL Admin API.

Stand-in only: CLOUD_SQL_PROXY_STAND_IN_BACKENDS, a JSON object mapping each instance
connection name to the PostgreSQL it stands for ("unix:/dir/.s.PGSQL.5432" or "host:port").
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

MODELLED_VERSION = "2.25.3"
ENV_PREFIX = "CSQL_PROXY"
BACKENDS_ENV = "CLOUD_SQL_PROXY_STAND_IN_BACKENDS"
POSTGRES_FIRST_PORT = 5432

# name: (kind, shorthand, default), cmd/root.go 508-624 at v2.25.3.
FLAGS: dict[str, tuple[str, str, object]] = {
    "help": ("bool", "h", False),
    "version": ("bool", "v", False),
    "config-file": ("string", "", ""),
    "user-agent": ("string", "", ""),
    "token": ("string", "t", ""),
    "login-token": ("string", "", ""),
    "credentials-file": ("string", "c", ""),
    "json-credentials": ("string", "j", ""),
    "gcloud-auth": ("bool", "g", False),
    "structured-logs": ("bool", "l", False),
    "debug-logs": ("bool", "", False),
    "max-connections": ("uint", "", 0),
    "min-sigterm-delay": ("duration", "", 0.0),
    "max-sigterm-delay": ("duration", "", 0.0),
    "telemetry-project": ("string", "", ""),
    "disable-traces": ("bool", "", False),
    "telemetry-sample-rate": ("int", "", 10_000),
    "disable-metrics": ("bool", "", False),
    "telemetry-prefix": ("string", "", ""),
    "exit-zero-on-sigterm": ("bool", "", False),
    "prometheus": ("bool", "", False),
    "prometheus-namespace": ("string", "", ""),
    "http-address": ("string", "", "localhost"),
    "http-port": ("string", "", "9090"),
    "debug": ("bool", "", False),
    "quitquitquit": ("bool", "", False),
    "admin-port": ("string", "", "9091"),
    "health-check": ("bool", "", False),
    "sqladmin-api-endpoint": ("string", "", ""),
    "universe-domain": ("string", "", ""),
    "quota-project": ("string", "", ""),
    "fuse": ("string", "", ""),
    "fuse-tmp-dir": ("string", "", "/tmp/csql-tmp"),
    "impersonate-service-account": ("string", "", ""),
    "quiet": ("bool", "", False),
    "auto-ip": ("bool", "", False),
    "lazy-refresh": ("bool", "", False),
    "resource-exhausted-cooldown-delay": ("duration", "", 0.0),
    "sqldata-api-endpoint": ("string", "", ""),
    "run-connection-test": ("bool", "", False),
    "skip-failed-instance-config": ("bool", "", False),
    "address": ("string", "a", "127.0.0.1"),
    "port": ("int", "p", 0),
    "unix-socket": ("string", "u", ""),
    "auto-iam-authn": ("bool", "i", False),
    "private-ip": ("bool", "", False),
    "psc": ("bool", "", False),
    "sql-data": ("bool", "", False),
}
ALIASES = {"sql-data-endpoint": "sqldata-api-endpoint"}  # the flag set's NormalizeFunc
SHORTHANDS = {short: name for name, (_, short, _) in FLAGS.items() if short}
SUBCOMMANDS = {"wait", "shutdown", "completion", "help"}
# internal/proxy/proxy.go's connNameRegex (unanchored, as FindSubmatch uses it).
CONN_NAME = re.compile(r"([^:]+(:[^:]+)?):([^:]+):([^:]+)")


class BadCommand(Exception):
    """What the real binary refuses at start-up (exit 1)."""


class NotModelled(Exception):
    """A setting the stand-in cannot honour: it stops rather than listen elsewhere."""


@dataclass(frozen=True)
class Listener:
    purpose: str  # "instance <name>", "http" or "admin"
    host: str
    port: int


@dataclass
class Instance:
    name: str
    address: str = ""
    port: int = 0
    query: dict = field(default_factory=dict)


@dataclass
class Config:
    values: dict
    given: set  # flags set on the command line or from the environment
    instances: list

    def __getitem__(self, name: str):
        return self.values[name]


def _parse_bool(raw: str) -> bool:
    # Go's strconv.ParseBool, which pflag uses.
    if raw in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise BadCommand(f'invalid argument "{raw}": strconv.ParseBool: parsing "{raw}": '
                     'invalid syntax')


def _parse_duration(raw: str) -> float:
    # Go's time.ParseDuration, the units a delay is given in.
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    if raw in ("0", ""):
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)", raw)
    if not parts or "".join(n + u for n, u in parts) != raw.lstrip("+"):
        raise BadCommand(f'invalid argument "{raw}": time: invalid duration "{raw}"')
    return sum(float(n) * units[u] for n, u in parts)


def _convert(name: str, raw: str) -> object:
    kind = FLAGS[name][0]
    if kind == "bool":
        return _parse_bool(raw)
    if kind in ("int", "uint"):
        try:
            value = int(raw, 0)
        except ValueError:
            raise BadCommand(f'invalid argument "{raw}" for "--{name}" flag') from None
        if kind == "uint" and value < 0:
            raise BadCommand(f'invalid argument "{raw}" for "--{name}" flag')
        return value
    if kind == "duration":
        return _parse_duration(raw)
    return raw


def _flag_name(raw: str) -> str:
    name = ALIASES.get(raw, raw)
    if name not in FLAGS:
        raise BadCommand(f"unknown flag: --{raw}")
    return name


def _parse_command_line(args: list[str]) -> tuple[dict, list[str]]:
    """pflag's parse: flags anywhere, `--` ends them, shorthands may be grouped."""
    given: dict[str, object] = {}
    positional: list[str] = []
    queue = list(args)
    while queue:
        arg = queue.pop(0)
        if arg == "--":
            positional += queue
            break
        if arg.startswith("--"):
            body = arg[2:]
            raw_name, has_value, value = body.partition("=")
            name = _flag_name(raw_name)
            if has_value:
                given[name] = _convert(name, value)
            elif FLAGS[name][0] == "bool":
                given[name] = True
            elif queue:
                given[name] = _convert(name, queue.pop(0))
            else:
                raise BadCommand(f"flag needs an argument: --{name}")
        elif arg.startswith("-") and len(arg) > 1:
            shorts = arg[1:]
            while shorts:
                char, shorts = shorts[0], shorts[1:]
                if char not in SHORTHANDS:
                    raise BadCommand(f"unknown shorthand flag: '{char}' in {arg}")
                name = SHORTHANDS[char]
                if shorts.startswith("="):
                    given[name] = _convert(name, shorts[1:])
                    shorts = ""
                elif FLAGS[name][0] == "bool":
                    given[name] = True
                elif shorts:
                    given[name] = _convert(name, shorts)
                    shorts = ""
                elif queue:
                    given[name] = _convert(name, queue.pop(0))
                else:
                    raise BadCommand(f"flag needs an argument: '{char}' in {arg}")
        else:
            positional.append(arg)
    return given, positional


def _query_bool(query: dict, name: str) -> bool | None:
    if name not in query:
        return None
    values = query[name]
    if len(values) != 1:
        raise BadCommand(f"{name} param should be only one value: {values!r}")
    lowered = values[0].lower()
    if lowered in ("true", "t", ""):
        return True
    if lowered in ("false", "f"):
        return False
    raise BadCommand(f"{name} query param should be true or false, got: {values[0]!r}")


def _ip(text: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except OSError:
            pass
    return False


def parse(args: list[str], env: dict[str, str]) -> Config:
    """The configuration the real binary would run with, or BadCommand/NotModelled."""
    given, positional = _parse_command_line(args)
    if positional and positional[0] in SUBCOMMANDS:
        raise NotModelled(f"the {positional[0]} subcommand")
    values = {name: default for name, (_, _, default) in FLAGS.items()}
    values.update(given)
    from_env = set()
    for name in FLAGS:
        key = f"{ENV_PREFIX}_{name.upper().replace('-', '_')}"
        if name not in given and env.get(key, "") != "":
            values[name] = _convert(name, env[key])
            from_env.add(name)
    if not positional:
        first = env.get(f"{ENV_PREFIX}_INSTANCE_CONNECTION_NAME") or \
            env.get(f"{ENV_PREFIX}_INSTANCE_CONNECTION_NAME_0")
        if first:
            positional = [first]
            n = 1
            while env.get(f"{ENV_PREFIX}_INSTANCE_CONNECTION_NAME_{n}"):
                positional.append(env[f"{ENV_PREFIX}_INSTANCE_CONNECTION_NAME_{n}"])
                n += 1
    config = Config(values, set(given) | from_env, [])
    if values["config-file"]:
        raise NotModelled("--config-file")
    if values["fuse"]:
        raise NotModelled("--fuse")
    if not positional:
        raise BadCommand("missing instance_connection_name (e.g., project:region:instance)")
    if "address" in config.given and "unix-socket" in config.given:
        raise BadCommand("cannot specify --unix-socket and --address together")
    if "port" in config.given and "unix-socket" in config.given:
        raise BadCommand("cannot specify --unix-socket and --port together")
    if not _ip(values["address"]):
        raise BadCommand(f"not a valid IP address: {values['address']!r}")
    if "private-ip" in config.given and "auto-ip" in config.given:
        raise BadCommand("cannot specify --private-ip and --auto-ip together")
    if sum(bool(values[n]) for n in ("private-ip", "psc", "sql-data")) > 1:
        raise BadCommand("cannot specify --private-ip, --psc, and --sql-data flags at the "
                         "same time")
    for raw in positional:
        name, _, query_text = raw.partition("?")
        query = parse_qs(query_text, keep_blank_values=True) if query_text else {}
        instance = Instance(name=name, query=query)
        if "address" in query and ("unix-socket" in query or "unix-socket-path" in query):
            raise BadCommand("cannot specify both address and unix-socket query params")
        if "port" in query and ("unix-socket" in query or "unix-socket-path" in query):
            raise BadCommand("cannot specify both port and unix-socket query params")
        if "address" in query:
            if len(query["address"]) != 1 or not _ip(query["address"][0]):
                raise BadCommand(f"address query param is not a valid IP address: "
                                 f"{query['address']!r}")
            instance.address = query["address"][0]
        if "port" in query:
            try:
                (instance.port,) = (int(p) for p in query["port"])
            except ValueError:
                raise BadCommand(f"port query param is not a valid integer: "
                                 f"{query['port']!r}") from None
        for option in ("auto-iam-authn", "private-ip", "psc"):
            _query_bool(query, option)
        tcp = not (values["unix-socket"] or "unix-socket" in query or "unix-socket-path" in query) \
            or bool(instance.address or instance.port)
        if not tcp:
            raise NotModelled(f"a Unix socket for {name}")
        if not CONN_NAME.search(name):
            raise BadCommand("invalid instance connection name, want = PROJECT:REGION:INSTANCE, "
                             f"got = {name}")
        config.instances.append(instance)
    return config


def listeners_of(config: Config) -> list[Listener]:
    """Every socket the binary opens, in the order it opens them."""
    found = []
    next_global, next_postgres = config["port"], POSTGRES_FIRST_PORT
    for instance in config.instances:
        if instance.port:
            port = instance.port
        elif config["port"]:
            port, next_global = next_global, next_global + 1
        else:
            port, next_postgres = next_postgres, next_postgres + 1
        found.append(Listener(f"instance {instance.name}",
                              instance.address or config["address"], port))
    if config["health-check"] or config["prometheus"]:
        found.append(Listener("http", config["http-address"], int(config["http-port"])))
    if config["debug"] or config["quitquitquit"]:
        found.append(Listener("admin", "localhost", int(config["admin-port"])))
    return found


def listeners(args: list[str], env: dict[str, str] | None = None) -> list[Listener]:
    return listeners_of(parse(list(args), dict(env or {})))


# --- the stand-in process --------------------------------------------------------------------

def log(message: str, severity: str = "INFO") -> None:
    print(json.dumps({"severity": severity, "message": message,
                      "stand-in": f"cloud-sql-proxy {MODELLED_VERSION}"}), flush=True)


def bind(listener: Listener) -> socket.socket:
    # Go resolves "localhost" and listens on one address of it, IPv4 first.
    host = "127.0.0.1" if listener.host == "localhost" else listener.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listeners do
    sock.bind((host, listener.port))
    sock.listen(128)
    return sock


def connect(backend: str) -> socket.socket:
    if backend.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(backend[len("unix:"):])
        return sock
    host, _, port = backend.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=5)


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve_instance(name: str, server: socket.socket, backends: dict[str, str]) -> None:
    while True:
        client, _ = server.accept()
        backend = backends.get(name)
        try:
            if backend is None:
                raise OSError("the stand-in has no backend for this instance")
            upstream = connect(backend)
            upstream.settimeout(None)
        except OSError as error:
            log(f"[{name}] failed to connect to instance: {error}", "ERROR")
            client.close()
            continue
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


def http_handler(config: Config, backends: dict[str, str], started: threading.Event,
                 shutdown: threading.Event):
    class Handler(BaseHTTPRequestHandler):
        def answer(self, status: int, body: str = "ok") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            if path == "/quitquitquit" and self.server.purpose == "admin" \
                    and config["quitquitquit"]:
                self.answer(200)
                shutdown.set()
            elif self.server.purpose == "admin":
                self.answer(404, "404 page not found")
            elif path == "/liveness" and config["health-check"]:
                self.answer(200)
            elif path == "/startup" and config["health-check"]:
                self.answer(200 if started.is_set() else 503)
            elif path == "/readiness" and config["health-check"]:
                try:
                    for instance in config.instances:
                        connect(backends[instance.name]).close()
                    self.answer(200)
                except (KeyError, OSError) as error:
                    self.answer(503, str(error))
            elif path == "/metrics" and config["prometheus"]:
                self.answer(200, "# the Cloud SQL Auth Proxy stand-in exports no metrics\n")
            else:
                self.answer(404, "404 page not found")

        do_POST = do_GET

        def log_message(self, *args) -> None:
            pass

    return Handler


def main(argv: list[str]) -> int:
    try:
        config = parse(argv, dict(os.environ))
    except BadCommand as error:
        print(f"Error: {error}", file=sys.stderr, flush=True)
        return 1
    except NotModelled as error:
        print(f"cloud-sql-proxy STAND-IN: {error} is not modelled; refusing to start",
              file=sys.stderr, flush=True)
        return 2
    backends = json.loads(os.environ.get(BACKENDS_ENV, "{}"))
    started, shutdown = threading.Event(), threading.Event()
    exit_code = {signal.SIGTERM: 0 if config["exit-zero-on-sigterm"] else 143,
                 signal.SIGINT: 130}
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)  # no lock here: the main thread may hold one (see below)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"Authorizing with Application Default Credentials (STAND-IN for "
        f"{MODELLED_VERSION}: no Google API is called)")
    # The database listeners first; the HTTP and admin servers once the proxy has started.
    for listener in listeners_of(config):
        where = f"{listener.host}:{listener.port}"
        try:
            sock = bind(listener)
        except OSError as error:
            if listener.purpose.startswith("instance "):
                name = listener.purpose.split(" ", 1)[1]
                log(f"[{name}] could not listen to address {where}: {error}", "ERROR")
                log(f"[{name}] Unable to mount socket: {error}", "ERROR")
            else:
                log(f"The proxy has encountered a terminal error: failed to start HTTP "
                    f"server: listen tcp {where}: bind: {error.strerror}", "ERROR")
            return 1
        if listener.purpose.startswith("instance "):
            name = listener.purpose.split(" ", 1)[1]
            log(f"[{name}] Listening on {where}")
            threading.Thread(target=serve_instance, args=(name, sock, backends),
                             daemon=True).start()
            continue
        if not started.is_set():
            log("The proxy has started successfully and is ready for new connections!")
            started.set()
        server = ThreadingHTTPServer(sock.getsockname()[:2],
                                     http_handler(config, backends, started, shutdown),
                                     bind_and_activate=False)
        server.socket.close()
        server.socket = sock  # the socket bound above: a failed bind has already ended us
        server.purpose = listener.purpose  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        if listener.purpose == "http":
            log(f"Starting health check server at {where}")
    if not started.is_set():
        log("The proxy has started successfully and is ready for new connections!")
        started.set()
    while not received and not shutdown.is_set():  # a sleep, not a wait: signal-safe
        time.sleep(0.1)
    signum = received[0] if received else None
    if signum == signal.SIGTERM:
        log("SIGTERM signal received. Shutting down...")
        time.sleep(config["min-sigterm-delay"])
        return exit_code[signal.SIGTERM]
    if signum == signal.SIGINT:
        log("SIGINT signal received. Shutting down...")
        return exit_code[signal.SIGINT]
    log("/quitquitquit received request. Shutting down...")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
