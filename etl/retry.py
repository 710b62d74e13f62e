"""Retrying what fails for a moment: S3 throttling and 5xx, dropped connections, deadlocks.

One classification for the whole engine, so that tenacity retries only transient failures
(bounded exponential backoff, each retry logged) and everything else fails at once with
one line. After the last try the failure becomes an ``EtlError``.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import sqlalchemy as sa
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .errors import EtlError

log = logging.getLogger("etl.retry")
ATTEMPTS = 5
_WAIT = wait_exponential(multiplier=0.5, max=10)

# SQLSTATE classes worth another try: serialization failure, deadlock, connection exceptions.
_PG_TRANSIENT = ("40001", "40P01", "08000", "08003", "08006", "57P01")
_MYSQL_TRANSIENT = (1205, 1213, 2003, 2006, 2013)


def transient(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, EndpointConnectionError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        ClientError = BotoConnectionError = EndpointConnectionError = ()
    if isinstance(exc, (BotoConnectionError, EndpointConnectionError)):
        return True
    if isinstance(exc, ValueError) and isinstance(exc.__cause__, ClientError):
        return transient(exc.__cause__)  # smart_open re-raises S3 errors as ValueError
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or err.get("Code") in ("SlowDown", "Throttling", "RequestTimeout", "InternalError")
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if code in _PG_TRANSIENT:
            return True
        if code is None and type(orig).__name__ == "OperationalError" and type(orig).__module__.startswith("psycopg"):
            return True  # no SQLSTATE: the connection itself failed (server restarting, closed socket)
        args = getattr(orig, "args", ())
        return bool(args) and args[0] in _MYSQL_TRANSIENT
    return False


def _reason(exc: BaseException) -> str:
    """The first line of what went wrong, from the driver's or S3's error rather than a wrapper's."""
    if isinstance(exc, ValueError) and exc.__cause__ is not None:
        exc = exc.__cause__  # smart_open's "bucket does not exist, or is forbidden" says less than S3 did
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip()
    return f"{type(inner).__name__}: {text.splitlines()[0] if text else ''}"


def _logger(what: str):
    def before_sleep(state) -> None:
        log.warning("%s: retry %d/%d in %.1f s after %s", what, state.attempt_number, ATTEMPTS - 1,
                    state.next_action.sleep, _reason(state.outcome.exception()))
    return before_sleep


def call(fn, *args, what: str, **kwargs):
    """``fn(*args, **kwargs)``, retried while it fails transiently; ``what`` names it in logs and errors."""
    try:
        for attempt in Retrying(stop=stop_after_attempt(ATTEMPTS), wait=_WAIT, retry=retry_if_exception(transient),
                                before_sleep=_logger(what), reraise=True):
            with attempt:
                return fn(*args, **kwargs)
    except Exception as exc:
        if transient(exc):
            raise EtlError(f"{what}: gave up after {ATTEMPTS} tries: {_reason(exc)}") from exc
        raise


def generator(make: Callable[[], Iterator], what: Callable[[], str]) -> Iterator:
    """The items of ``make()``; when it fails transiently it is made again, and carries on from
    what was already yielded (``make`` resumes from there). A failure right after a retry
    counts towards the same ``ATTEMPTS``; an item yielded starts the count again."""
    failures = 0
    while True:
        try:
            for item in make():
                failures = 0
                yield item
            return
        except Exception as exc:
            if not transient(exc):
                raise
            failures += 1
            if failures >= ATTEMPTS:
                raise EtlError(f"{what()}: gave up after {ATTEMPTS} tries: {_reason(exc)}") from exc
            pause = min(10.0, 0.5 * 2 ** (failures - 1))  # as _WAIT waits
            log.warning("%s: retry %d/%d in %.1f s after %s", what(), failures, ATTEMPTS - 1, pause, _reason(exc))
            time.sleep(pause)


def storage(fn, *args, what: str):
    """A call to S3 or the file system; a lasting failure (no such bucket, access denied, disk full)
    becomes one line naming the file."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call(fn, *args, what=what)
    except OSError as exc:
        raise EtlError(f"{what}: {exc.strerror or exc}") from exc
    except (ClientError, BotoCoreError, ValueError) as exc:
        cause = exc.__cause__ if isinstance(exc, ValueError) else exc
        if not isinstance(cause, (ClientError, BotoCoreError)):
            raise
        err = getattr(cause, "response", {}).get("Error", {})
        raise EtlError(f"{what}: {err.get('Message') or err.get('Code') or str(cause).splitlines()[0]}") from exc
