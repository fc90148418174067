"""`nox -s fuzz`: schemathesis against the real server, from its own OpenAPI document.

Starts `python -m app` on a throwaway PostgreSQL database and lets schemathesis
generate valid and invalid requests for every operation. The run fails on any
5xx and on any response that contradicts the document (status, content type,
headers, body schema). positive_data_acceptance is left out on purpose: a
schema-valid username such as "a1" is still refused, because "a letter, then
letters and combining marks, none default-ignorable" is not expressible as a
JSON Schema pattern; that rule is pinned by the API tests instead.
schemathesis keeps its state (its cache of crashes) in a temporary
directory, so a run leaves the tree as it found it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from tests.conftest import DEFAULT_TEST_DATABASE_URL, PostgresServer, migrate
from tests.live_server import LiveServer

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "unsupported_method",
    "allow_header_conformance",
])


def main(argv: list[str]) -> int:
    from app.settings import normalise_database_url

    server = PostgresServer(normalise_database_url(
        os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)))
    url = server.create_database()
    try:
        migrate(url)
        with LiveServer(url, LOG_LEVEL="WARNING") as live:
            command = [
                "schemathesis", "run", f"{live.url}/openapi.json",
                "--checks", CHECKS,
                "--max-examples", os.environ.get("FUZZ_MAX_EXAMPLES", "150"),
                "--seed", os.environ.get("FUZZ_SEED", "20261126"),
                "--request-timeout", "10",
                "--workers", "2",
                *argv,
            ]
            print("+", " ".join(command), flush=True)
            with tempfile.TemporaryDirectory(prefix="schemathesis-") as state:
                code = subprocess.call(command, cwd=state)
            if live.process.poll() is not None:
                print("the server died during the fuzz run", file=sys.stderr)
                return 1
            return code
    finally:
        server.drop_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
