"""The Dagster instance on PostgreSQL: the URL as providers print it, and one clear line when it is unreachable.

``deploy/dagster.yaml`` names :class:`PostgresStorage` as the instance's storage, so every
Dagster process of a deployment (``dagster-daemon``, ``dagster-webserver``, the code servers and
run workers they start, ``dagster instance info``, ``amygdala run``) opens the database through it:

- :func:`driver_url` -- ``postgresql://user:pw@host:5432/db`` (and Heroku-style ``postgres://``), as
  every provider prints it, gets the driver dagster-postgres ships with, psycopg2. SQLAlchemy 2.1
  maps a bare URL to psycopg 3, and dagster-postgres does not work on psycopg 3: the webserver's
  statement-timeout hook runs ``with conn:`` on each new connection, which psycopg 3 takes as
  "close it" ("the connection is closed" on the first query). A URL naming its driver is kept.
- :func:`check_reachable` -- one bounded connection attempt (tenacity: 3 tries, 5 s connect
  timeout each) before dagster-postgres's own engines start; a database that cannot be reached is
  :class:`InstanceUnavailable` naming the host, the port and the variable the URL came from (never
  the password), instead of 18 s of retries and a traceback.

:func:`open_instance` maps every way the instance fails to open (a missing variable, a bad
dagster.yaml, an unreachable database) to :class:`InstanceUnavailable`, which the commands print as
one line (exit 1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.ref import InstanceRef
from dagster._serdes import ConfigurableClassData
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_fixed

#: Seconds a single connection attempt may take (libpq ``connect_timeout``).
CONNECT_TIMEOUT_S = 5
CONNECT_ATTEMPTS = 3
_BARE_SCHEMES = {"postgresql", "postgres"}


class InstanceUnavailable(RuntimeError):
    """The Dagster instance cannot be opened; the message is one line, with no secret in it."""


def driver_url(url: str) -> str:
    """``url`` with the psycopg2 driver named when it names none (``postgresql://`` or ``postgres://``)."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in _BARE_SCHEMES:
        return f"postgresql+psycopg2://{rest}"
    return url


def describe(url: str) -> str:
    """``host:port/db`` of a PostgreSQL URL, without user or password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "the configured host"
    db = parts.path.lstrip("/")
    return f"{host}:{port}" + (f"/{db}" if db else "")


def _reason(exc: BaseException, url: str) -> str:
    """The driver's first line, e.g. ``Connection refused``, with the password (if any) masked."""
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    text = lines[0] if lines else type(orig).__name__
    text = re.sub(r'^connection to server at "[^"]*"(?: \([^)]*\))?, port \d+ failed: ', "", text)
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def check_reachable(url: str, source: str = "the instance's postgres_url") -> None:
    """Connect once (a few quick tries) or raise :class:`InstanceUnavailable` naming the host and ``source``."""
    import sqlalchemy
    from sqlalchemy.exc import DBAPIError

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
                                      poolclass=sqlalchemy.pool.NullPool)

    @retry(retry=retry_if_exception_type(DBAPIError), stop=stop_after_attempt(CONNECT_ATTEMPTS),
           wait=wait_fixed(1), reraise=True)
    def connect() -> None:
        with engine.connect():
            pass

    try:
        connect()
    except DBAPIError as exc:
        raise InstanceUnavailable(
            f"cannot reach the Dagster instance's PostgreSQL database at {describe(url)} "
            f"(the URL comes from {source}): {_reason(exc, url)}"
        ) from None
    finally:
        engine.dispose()


def _source(inst_data: ConfigurableClassData | None) -> str:
    """Where the URL came from: ``$VAR`` when dagster.yaml reads it from the environment."""
    config: Mapping[str, Any] = inst_data.config_dict if inst_data is not None else {}
    raw = config.get("postgres_url")
    if isinstance(raw, Mapping) and raw.get("env"):
        return f"${raw['env']}"
    return "postgres_url in dagster.yaml"


try:  # the [deploy] extra
    from dagster_postgres import DagsterPostgresStorage
    from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config
except ImportError:  # pragma: no cover - a local install without the extra never names this class
    DagsterPostgresStorage = None  # type: ignore[assignment,misc]

if DagsterPostgresStorage is not None:

    class PostgresStorage(DagsterPostgresStorage):
        """dagster-postgres' storage, opened from the URL as providers print it (see the module docstring).

        Same configuration as ``storage: postgres:`` (``postgres_url`` or ``postgres_db``); in dagster.yaml::

            storage:
              custom:
                module: amygdala_dagster.pipeline.instance
                class: PostgresStorage
                config:
                  postgres_url:
                    env: DAGSTER_POSTGRES_URL
        """

        @classmethod
        def from_config_value(cls, inst_data: ConfigurableClassData | None,
                              config_value: Mapping[str, Any]) -> PostgresStorage:
            url = driver_url(pg_url_from_config(config_value))
            check_reachable(url, _source(inst_data))
            return cls(inst_data=inst_data, postgres_url=url,
                       should_autocreate_tables=config_value.get("should_autocreate_tables", True),
                       token_provider=get_token_provider_from_config(config_value))


def open_instance(home: str) -> dg.DagsterInstance:
    """The instance whose ``dagster.yaml`` is in ``home``; :class:`InstanceUnavailable` (one line) when it
    cannot be opened."""
    try:
        return dg.DagsterInstance.from_ref(InstanceRef.from_dir(home))
    except InstanceUnavailable:
        raise
    except DagsterInvalidConfigError as exc:
        missing = re.search(r'environment variable "([^"]+)" which is not set', str(exc))
        if missing:
            raise InstanceUnavailable(f"{home}/dagster.yaml reads ${missing.group(1)}, which is not set") from None
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "invalid configuration")
        raise InstanceUnavailable(f"{home}/dagster.yaml: {first}") from None
    except Exception as exc:  # noqa: BLE001 - dagster-postgres's retries end in its own exception types
        from sqlalchemy.exc import DBAPIError

        cause: BaseException = exc
        while cause.__cause__ is not None and not isinstance(cause, DBAPIError):
            cause = cause.__cause__
        if isinstance(cause, DBAPIError) or type(exc).__name__ == "DagsterPostgresException":
            raise InstanceUnavailable(f"cannot reach the Dagster instance's database ({home}/dagster.yaml): "
                                      f"{_reason(cause, '')}") from None
        raise
