"""The agent's own exception, apart so that registration and requests can both raise it without importing each other."""

from __future__ import annotations


class Refused(Exception):
    """A request the source site does not allow; the message goes back to the requester."""
