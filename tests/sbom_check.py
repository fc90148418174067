"""Check a CycloneDX SBOM against a pip lock: every locked package is listed,
at the locked version. `python -m tests.sbom_check SBOM LOCK` (nox -s sbom)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing(sbom: dict, lock_text: str) -> list[str]:
    listed = {(normalise(c["name"]), c.get("version")) for c in sbom.get("components", [])}
    locked = {(normalise(name), version) for name, version in PIN.findall(lock_text)}
    return sorted(f"{name}=={version}" for name, version in locked - listed)


def main(sbom_path: str, lock_path: str) -> int:
    sbom = json.loads(Path(sbom_path).read_text())
    assert sbom.get("bomFormat") == "CycloneDX", "not a CycloneDX document"
    absent = missing(sbom, Path(lock_path).read_text())
    if absent:
        print("SBOM lacks locked packages: " + ", ".join(absent), file=sys.stderr)
        return 1
    print(f"SBOM {sbom_path}: {len(sbom['components'])} components, every package of "
          f"{lock_path} at its locked version (CycloneDX {sbom.get('specVersion')})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
