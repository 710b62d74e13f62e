"""Errors sorted by what the caller should do with them.

The CLI prints an ``EtlError`` as one line and exits 1; ``UsageError`` exits 2 like argparse;
``TransientError`` is what tenacity retries (dropped connections, serialization failures,
S3 throttling) and becomes an ``EtlError`` once retries are exhausted.
"""
from __future__ import annotations


class EtlError(Exception):
    """A failure a person can act on; the message is one line naming table, chunk, row or file."""


class UsageError(EtlError):
    """The command line or API call itself is wrong."""


class TransientError(EtlError):
    """Worth retrying: the same call may succeed a moment later."""
