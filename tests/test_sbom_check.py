"""The SBOM check fails on a package the lock pins and the SBOM lacks."""

from tests.sbom_check import missing

LOCK = "alembic==1.20.1 \\\n    --hash=sha256:00\npsycopg-pool==3.3.3 \\\n    --hash=sha256:11\n"


def test_every_pin_listed_passes():
    sbom = {"components": [{"name": "alembic", "version": "1.20.1"},
                           {"name": "psycopg_pool", "version": "3.3.3"}]}
    assert missing(sbom, LOCK) == []


def test_a_missing_or_other_version_fails():
    sbom = {"components": [{"name": "alembic", "version": "1.20.0"}]}
    assert missing(sbom, LOCK) == ["alembic==1.20.1", "psycopg-pool==3.3.3"]
