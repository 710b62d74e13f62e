"""Retrying what fails for a moment: S3 throttling and 5xx, dropped connections, deadlocks.

One classification for the whole engine, so that tenacity retries only transient failures
(bounded exponential backoff, each retry logged) and everything else fails at once with
one line. After the last try the failure becomes an ``EtlError``.
"""
from __future__ import annotations

import logging

import sqlalchemy as sa
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .errors import EtlError

log = logging.getLogger("etl.retry")
ATTEMPTS = 5
_WAIT = wait_exponential(multiplier=0.5, max=10)

# SQLSTATE classes worth another try: serialization failure, deadlock, connection exceptions.
_PG_TRANSIENT = ("40001", "40P01", "08000", "08003", "08006", "57P01")
_MYSQL_TRANSIENT = (1205, 1213, 2006, 2013)


def transient(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, EndpointConnectionError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        ClientError = BotoConnectionError = EndpointConnectionError = ()
    if isinstance(exc, (BotoConnectionError, EndpointConnectionError)):
        return True
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or err.get("Code") in ("SlowDown", "Throttling", "RequestTimeout", "InternalError")
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        code = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None)
        if code in _PG_TRANSIENT:
            return True
        args = getattr(orig, "args", ())
        return bool(args) and args[0] in _MYSQL_TRANSIENT
    return False


def _log(state) -> None:
    exc = state.outcome.exception()
    log.warning("retry %d/%d after %s: %s", state.attempt_number, ATTEMPTS, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


def call(fn, *args, what: str, **kwargs):
    """``fn(*args, **kwargs)``, retried while it fails transiently."""
    try:
        for attempt in Retrying(stop=stop_after_attempt(ATTEMPTS), wait=_WAIT, retry=retry_if_exception(transient),
                                before_sleep=_log, reraise=True):
            with attempt:
                return fn(*args, **kwargs)
    except RetryError as exc:  # pragma: no cover - reraise=True re-raises the last error instead
        raise EtlError(f"{what}: gave up after {ATTEMPTS} tries") from exc
    except Exception as exc:
        if transient(exc):
            raise EtlError(f"{what}: gave up after {ATTEMPTS} tries: {str(exc).splitlines()[0]}") from exc
        raise


def storage(fn, *args, what: str):
    return call(fn, *args, what=what)
