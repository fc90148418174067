"""Parse a file the way a gcloud command does, with gcloud's own modules and
its bundled Python, and list what the API's message types do not know.

    <gcloud's python> tests/cloud/gcloud_parse.py alert-policy FILE...

Prints one JSON object per file: {"file": ..., "error": ... or null,
"unknown": [dotted paths of fields the message type has no slot for]}.
gcloud's own parser keeps unknown fields without complaint (apitools'
PyValueToMessage), so each message is walked for them here."""

from __future__ import annotations

import json
import sys


def unknown_fields(message, path: str = "") -> list[str]:
    from apitools.base.protorpclite import messages

    found = [f"{path}{name}" for name in message.all_unrecognized_fields()]
    for field in message.all_fields():
        value = message.get_assigned_value(field.name)
        if value is None or not isinstance(field, messages.MessageField):
            continue
        for index, item in enumerate(value if field.repeated else [value]):
            suffix = f"[{index}]" if field.repeated else ""
            found += unknown_fields(item, f"{path}{field.name}{suffix}.")
    return found


def main(kind: str, files: list[str]) -> None:
    from googlecloudsdk.api_lib.util import apis
    from googlecloudsdk.command_lib.monitoring import util

    if kind != "alert-policy":
        raise SystemExit(f"unknown kind {kind}")
    messages = apis.GetMessagesModule("monitoring", "v3")
    for name in files:
        with open(name) as handle:
            text = handle.read()
        try:  # what `gcloud alpha monitoring policies create --policy-from-file` calls
            policy = util.MessageFromString(text, messages.AlertPolicy, "AlertPolicy")
            print(json.dumps({"file": name, "error": None, "unknown": unknown_fields(policy)}))
        except Exception as error:  # noqa: B902 - reported, not hidden
            print(json.dumps({"file": name, "error": str(error), "unknown": []}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
