"""An Airflow 3 API server as a worker's task reaches it: over HTTP, with a token, never the database.

Airflow 3's workers hold no database session, so the 3.x DAGs (``etl.airflow``) start and watch
the plugin's jobs (``etl.plugin``) and pause the other DAGs through the public REST API. The
address and the credentials are an HTTP connection the user names: its host is the API server's
base URL (or host, port and the scheme as schema, as HttpHook reads them); with a login, login and password are exchanged at ``/auth/token`` for a token (and
again when it expires), without one the password is the token itself.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from .errors import EtlError

log = logging.getLogger("etl.airflow_api")

#: An API server that restarts (MWAA replaces its containers) is waited for this long before a task fails.
UNREACHABLE_SECONDS = 300.0


class Refused(EtlError):
    """The API server answered, and said no: ``status`` is its HTTP status."""

    def __init__(self, status: int, line: str):
        super().__init__(line)
        self.status = status


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (502, 503, 504)
    return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError))


class ApiServer:
    def __init__(self, base: str, login: str | None, password: str | None):
        if not base.startswith(("http://", "https://")):
            raise EtlError(f"the API server's address must be its base URL (http[s]://host[:port]), not {base!r}")
        self.base, self.login, self.password = base.rstrip("/"), login, password
        self._token = None if login else password

    @classmethod
    def from_connection(cls, conn_id: str) -> ApiServer:
        from airflow.sdk import Connection

        conn = Connection.get(conn_id)
        host = conn.host or ""
        if "://" not in host:  # as Airflow's HttpHook reads one: the scheme is the schema field
            host = f"{conn.schema or 'http'}://{host}"
        if conn.port:
            host = f"{host}:{conn.port}"
        return cls(host, conn.login or None, conn.password or None)

    def _send(self, method: str, path: str, body: dict | None, token: str | None) -> dict | list | None:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.base + path, method=method, headers=headers,
                                         data=None if body is None else json.dumps(body).encode())
        for attempt in Retrying(retry=retry_if_exception(_unreachable), stop=stop_after_delay(UNREACHABLE_SECONDS),
                                wait=wait_exponential(multiplier=1, max=15), reraise=True,
                                before_sleep=lambda s: log.warning("the API server at %s did not answer (%s); trying again",
                                                                   self.base, s.outcome.exception())):
            with attempt:
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        return json.loads(response.read() or b"null")
                except urllib.error.HTTPError as exc:
                    if _unreachable(exc):
                        raise
                    raise Refused(exc.code, f"{method} {path}: HTTP {exc.code}: {_detail(exc)}") from None

    def _new_token(self) -> str:
        if not self.login:
            raise EtlError(f"the API server at {self.base} refused the token given as the connection's password")
        answer = self._send("POST", "/auth/token", {"username": self.login, "password": self.password}, None)
        return answer["access_token"]

    def call(self, method: str, path: str, body: dict | None = None):
        """One request; a token that expired meanwhile is renewed once."""
        if self._token is None:
            self._token = self._new_token()
        try:
            return self._send(method, path, body, self._token)
        except Refused as exc:
            if exc.status != 401 or not self.login:
                raise
            self._token = self._new_token()
            return self._send(method, path, body, self._token)

    # -- the plugin's jobs ------------------------------------------------------------------

    def start_job(self, request: dict) -> dict:
        """A new job, or the one already running for the same request: a task retried after its
        worker died finds the job it had started still going and watches that one."""
        try:
            return self.call("POST", "/etl/jobs", request)
        except Refused as exc:
            if exc.status != 409:
                raise
            for job in self.call("GET", "/etl/jobs"):
                if job["state"] == "running" and (job["job"], job["dest"]) == (request["job"], request["dest"]):
                    log.info("job %s for this request is already running; watching it", job["id"])
                    return job
            raise

    def wait(self, job: dict, every: float = 5.0) -> dict:
        """The job once it ended, its progress in the task log meanwhile."""
        shown: dict = {}
        while True:
            for table, line in (job.get("progress") or {}).items():
                if shown.get(table) != line:
                    log.info("%s: %s", table, line)
                    shown[table] = line
            if job["state"] != "running":
                return job
            time.sleep(every)
            job = self.call("GET", f"/etl/jobs/{job['id']}")

    # -- pausing, through the public REST API -------------------------------------------------

    def unpaused(self) -> list[str]:
        ids: list[str] = []
        while True:
            page = self.call("GET", f"/api/v2/dags?paused=false&limit=100&offset={len(ids)}")
            ids += [d["dag_id"] for d in page["dags"]]
            if not page["dags"] or len(ids) >= page["total_entries"]:
                return ids

    def set_paused(self, ids, paused: bool) -> None:
        for dag_id in ids:
            try:
                self.call("PATCH", f"/api/v2/dags/{urllib.parse.quote(dag_id, safe='')}", {"is_paused": paused})
            except Refused as exc:
                if exc.status != 404:  # a DAG deleted meanwhile has no state to keep
                    raise


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(exc.read() or b"null")
    except ValueError:
        return exc.reason
    if isinstance(detail, dict) and "detail" in detail:
        detail = detail["detail"]
    return detail if isinstance(detail, str) else json.dumps(detail)[:500]
