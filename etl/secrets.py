"""Fernet re-keying of variables, connections and trigger kwargs, in memory only.

Airflow encrypts ``variable.val``, ``connection.password`` and ``connection.extra`` with the
deployment's Fernet key (a comma list is a MultiFernet: the first key encrypts, all decrypt),
and since 2.9 (revision 1949afb29106) ``trigger.kwargs`` too.
A new deployment usually has a new key, so values are decrypted with the source's keys and
re-encrypted with the target's, never written anywhere in clear. The new token reuses the old
token's timestamp and an IV derived from the old token, so re-running a migration produces the
same ciphertext and an idempotent load stays idempotent.
"""
from __future__ import annotations

import base64
import hashlib
import hmac

import pyarrow as pa
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from . import batches
from .errors import EtlError, UsageError

#: (table, value column, flag column saying the value is encrypted, column that names the row).
#: trigger has no flag: Airflow reads kwargs starting with "{" as plain JSON (written before 2.9,
#: or without a Fernet key), anything else as a token.
ENCRYPTED = {
    "variable": [("val", "is_encrypted", "key")],
    "connection": [("password", "is_encrypted", "conn_id"), ("extra", "is_extra_encrypted", "conn_id")],
    "trigger": [("kwargs", None, "id")],
}


def _multi(keys: str, which: str) -> tuple[MultiFernet, list[Fernet]]:
    try:
        fernets = [Fernet(k.strip().encode()) for k in keys.split(",") if k.strip()]
    except (ValueError, TypeError):
        raise UsageError(f"--{which}-fernet-key is not a Fernet key (32 url-safe base64-encoded bytes)") from None
    if not fernets:
        raise UsageError(f"--{which}-fernet-key is empty")
    return MultiFernet(fernets), fernets


class Rekeyer:
    """Decrypts with the source keys and encrypts with the target's first key."""

    #: The tables whose source values ``check`` reads before anything is written.
    tables = tuple(ENCRYPTED)

    def __init__(self, source_keys: str | None, target_keys: str | None):
        if bool(source_keys) != bool(target_keys):
            raise UsageError("give both --source-fernet-key and --target-fernet-key, or neither (ciphertext is then copied as is)")
        self.active = bool(source_keys)
        if self.active:
            self.source, _ = _multi(source_keys, "source")
            _, target = _multi(target_keys, "target")
            self.target = target[0]
            self._mac_key = hashlib.sha256(target_keys.split(",")[0].strip().encode()).digest()

    def check(self, table: str, batch: pa.RecordBatch) -> None:
        """Fail before anything is written if a source value does not decrypt, naming the row, not the value."""
        for value_col, flag_col, name_col in self._columns(table, batch):
            names = batch.column(name_col).to_pylist()
            for value, encrypted, name in zip(batch.column(value_col).to_pylist(), self._flags(batch, value_col, flag_col), names):
                if encrypted:
                    try:
                        self.source.decrypt(value.encode())
                    except InvalidToken:
                        raise EtlError(f"the source Fernet key cannot decrypt {table}.{value_col} of {name_col}={name!r}") from None

    def rekey(self, table: str, batch: pa.RecordBatch) -> pa.RecordBatch:
        for value_col, flag_col, _ in self._columns(table, batch):
            values = batch.column(value_col).to_pylist()
            new = [self._reencrypt(v) if f else v for v, f in zip(values, self._flags(batch, value_col, flag_col))]
            field = batch.schema.field(value_col)
            batch = batches.put(batch, field, pa.array(new, field.type))
        return batch

    def _columns(self, table: str, batch: pa.RecordBatch):
        if not self.active:
            return []
        return [c for c in ENCRYPTED.get(table, []) if all(n in batch.schema.names for n in c if n)]

    @staticmethod
    def _flags(batch: pa.RecordBatch, value_col: str, flag_col: str | None) -> list[bool]:
        values = batch.column(value_col).to_pylist()
        if flag_col is None:
            return [bool(v) and not v.startswith("{") for v in values]
        return [bool(f and v) for v, f in zip(values, batch.column(flag_col).to_pylist())]

    def _reencrypt(self, token: str) -> str:
        raw = token.encode()
        plain = self.source.decrypt(raw)
        # A token's bytes 1-8 are its time, read here once decrypt has checked it (MultiFernet's
        # extract_timestamp came with cryptography 44; Airflow pins older).
        stamp = int.from_bytes(base64.urlsafe_b64decode(raw)[1:9], "big")
        iv = hmac.new(self._mac_key, raw, hashlib.sha256).digest()[:16]
        return self.target._encrypt_from_parts(plain, stamp, iv).decode()


def fingerprint(keys: str) -> str:
    """Names a key in reports without revealing it."""
    return base64.urlsafe_b64encode(hashlib.sha256(keys.split(",")[0].strip().encode()).digest()[:6]).decode()
