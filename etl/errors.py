"""Errors sorted by what the caller should do with them.

The CLI prints an ``EtlError`` as one line and exits 1; ``UsageError`` exits 2 like argparse.
What is worth retrying is decided by ``etl.retry`` from the driver's and S3's own errors.
"""
from __future__ import annotations


class EtlError(Exception):
    """A failure a person can act on; the message is one line naming table, chunk, row or file."""


class UsageError(EtlError):
    """The command line or API call itself is wrong."""
