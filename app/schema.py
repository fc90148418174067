"""The schema this code needs, and whether a database's schema satisfies it.

The alembic revisions this release ships, oldest first, kept as data inside the
package: a wheel or an image may carry ``app/`` without ``migrations/`` beside
it, and readiness must still know its head there. ``tests/test_migrations.py``
fails when this list and alembic's script directory disagree.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

REVISIONS: tuple[str, ...] = ("0001",)
HEAD = REVISIONS[-1]


def schema_verdict(stored: Collection[str], known: Sequence[str] = REVISIONS) -> str | None:
    """None when a schema at ``stored`` can serve this code, else why not.

    Ready at the head or newer: a revision this code does not know was written
    by a later release (expand/contract keeps it readable by this one), so a
    previous release keeps serving, and a rollback becomes ready, on it.
    """
    if not stored:
        return "the database has no schema yet (run the migrations)"
    if any(revision not in known for revision in stored):
        return None  # newer than this code
    if known[-1] in stored:
        return None
    return f"the schema is at {', '.join(sorted(stored))}, older than this release's {known[-1]}"
