"""Limits of the domain itself, below both the HTTP layer and the table."""

from __future__ import annotations

# Usernames are 1 to 64 letters after NFC normalisation; the table's key
# column is exactly that wide.
USERNAME_MAX_LENGTH = 64
