"""Real servers for the tests: PostgreSQL, MariaDB/MySQL, SQLite files and moto's S3 server over HTTP.

Server URLs come from ``ETL_TEST_POSTGRES_URL`` / ``ETL_TEST_MYSQL_URL``; without them a
testcontainers container is started when a Docker engine answers; otherwise the tests skip,
unless ``ETL_REQUIRE_SERVERS=1`` (CI), where a missing server fails the run. Every database a
test gets is created here under a unique name and dropped here, and no other.
"""
from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa

from etl import urls

REQUIRE = os.environ.get("ETL_REQUIRE_SERVERS") == "1"


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory):
    """A migrate without --via keeps its quarantine in the user's state folder: the tests' own, not the home's."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


def _unavailable(what: str) -> None:
    if REQUIRE:
        pytest.fail(f"{what} is required (ETL_REQUIRE_SERVERS=1) but not reachable")
    pytest.skip(f"{what} not reachable")


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


class Server:
    """A database server the tests may create and drop their own databases on."""

    def __init__(self, url: str, stop=None):
        self.url = urls.normalize(url)
        self.backend = self.url.get_backend_name()
        self.engine = sa.create_engine(self.url.set(database="postgres" if self.backend == "postgresql" else None),
                                       isolation_level="AUTOCOMMIT")
        self._stop = stop
        self.created: list[str] = []

    def reachable(self) -> bool:
        try:
            with self.engine.connect():
                return True
        except sa.exc.DBAPIError:
            return False

    def create(self, prefix: str = "etl_test", template: str | None = None) -> str:
        """A new database; on PostgreSQL optionally a copy of ``template`` (a URL this server created)."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self.engine.connect() as conn:
            if self.backend == "mysql":
                conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
            elif template:
                source = sa.engine.make_url(template).database
                assert source in self.created, "tests copy only the databases they created"
                conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
            else:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = sa.engine.make_url(url).database
        assert name in self.created, "tests drop only the databases they created"
        with self.engine.connect() as conn:
            if self.backend == "mysql":
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
            else:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.remove(name)

    def close(self) -> None:
        for name in list(self.created):
            self.drop(self.url.set(database=name).render_as_string(hide_password=False))
        self.engine.dispose()
        if self._stop:
            self._stop()


def _server(env: str, container_factory, what: str):
    url = os.environ.get(env)
    if url:
        server = Server(url)
        return server if server.reachable() else None
    if _docker_answers():
        container = container_factory()
        container.start()
        return Server(container.get_connection_url(), stop=container.stop)
    return None


@pytest.fixture(scope="session")
def pg_server():
    def factory():
        from testcontainers.postgres import PostgresContainer

        return PostgresContainer("postgres:15")

    server = _server("ETL_TEST_POSTGRES_URL", factory, "PostgreSQL")
    if server is None:
        _unavailable("PostgreSQL")
    yield server
    server.close()


@pytest.fixture(scope="session")
def mysql_server():
    def factory():
        from testcontainers.mysql import MySqlContainer

        return MySqlContainer("mariadb:10.11", username="root", password="test")

    server = _server("ETL_TEST_MYSQL_URL", factory, "MySQL/MariaDB")
    if server is None:
        _unavailable("MySQL/MariaDB")
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty PostgreSQL database (``postgresql+psycopg://``), dropped after the test."""
    url = pg_server.create()
    yield url
    pg_server.drop(url)


@pytest.fixture
def mysql_url(mysql_server):
    """A fresh, empty MariaDB/MySQL database (``mysql+pymysql://``), dropped after the test."""
    url = mysql_server.create()
    yield url
    mysql_server.drop(url)


@pytest.fixture
def sqlite_url(tmp_path):
    """A SQLite file path that does not exist yet."""
    return f"sqlite:///{tmp_path / 'airflow.db'}"


@pytest.fixture(params=["postgresql", "mysql", "sqlite"])
def any_url(request):
    """The same test on each dialect we load into."""
    return request.getfixturevalue({"postgresql": "pg_url", "mysql": "mysql_url", "sqlite": "sqlite_url"}[request.param])


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 over real HTTP; credentials are dummies moto accepts."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A new, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"etl-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
