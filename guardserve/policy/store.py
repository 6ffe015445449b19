"""Where forget targets live: one interface, SQLite (embedded default) and Postgres
(several replicas) behind it.

Every change and its audit line are written in one transaction, so a writer killed
mid-write (kill -9) leaves either both or neither. The audit log is append-only, enforced
by the database (triggers refuse UPDATE and DELETE on it), and its ``seq`` orders all
changes so that a detector (or a replica) catches up with ``changes_since(seq)`` instead
of reloading everything.

Schemas are versioned: each database records the migrations applied to it in
``schema_version``, and opening a store applies the missing ones in order (one writer at a
time), so a fleet can be upgraded replica by replica; a database written by a newer
guardserve is refused rather than misread. Postgres stores tell the other replicas of each
change at commit (``NOTIFY``), which :meth:`PolicyStore.wait_for_change` waits on.
"""

from __future__ import annotations

import builtins  # PolicyStore.list shadows the builtin in the class body: annotations after it say builtins.list
import json
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path

from guardserve.policy.model import (
    AuditEntry,
    DuplicateTargetError,
    ForgetTarget,
    PolicyError,
    StoreUnavailableError,
    TargetNotFoundError,
    ValidationError,
    VersionConflictError,
    name_key,
    new_target_id,
    validate_spec,
    validate_tenant,
)

_BODY_FIELDS = ("aliases", "description", "facts", "texts")


class PolicyStore(ABC):
    """The registry of forget targets. Implementations are safe to share between threads
    and to use from several processes (or hosts, for Postgres) at once."""

    @abstractmethod
    def add_many(self, specs: list[dict], actor: str = "cli") -> list[ForgetTarget]:
        """Register several targets atomically: all of them or, on any error, none."""

    @abstractmethod
    def get(self, target_id: str) -> ForgetTarget:
        """The target; raises TargetNotFoundError."""

    @abstractmethod
    def list(self, tenant: str | None = None, include_global: bool = True) -> list[ForgetTarget]:
        """Targets visible to ``tenant`` (its own plus, unless told not to, the global
        ones); ``tenant=None`` lists every target."""

    @abstractmethod
    def update(self, target_id: str, changes: dict, actor: str = "cli", expected_version: int | None = None) -> ForgetTarget:
        """Apply a partial change; the version goes up by one."""

    @abstractmethod
    def delete(self, target_id: str, actor: str = "cli") -> None:
        """Remove a target; raises TargetNotFoundError."""

    @abstractmethod
    def changes_since(self, seq: int = 0, limit: int = 10_000) -> builtins.list[AuditEntry]:
        """Audit entries with ``seq`` greater than the given one, oldest first."""

    @abstractmethod
    def get_setting(self, key: str, default=None):
        """A JSON value stored with the policy (e.g. the detector's calibrated threshold)."""

    @abstractmethod
    def set_setting(self, key: str, value, actor: str = "cli") -> None:
        """Store a JSON value with the policy (audited)."""

    @abstractmethod
    def update_setting(self, key: str, change, actor: str = "cli"):
        """Read-modify-write a setting atomically, against every other writer of the store:
        ``change(value or None) -> (new value, result)``; returns ``result``."""

    @abstractmethod
    def close(self) -> None: ...

    def wait_for_change(self, timeout: float) -> bool:
        """Block until another writer may have changed the policy, or ``timeout`` s passed;
        True when woken by a change. The default cannot be told and simply waits: callers
        poll ``changes_since`` after each call either way."""
        time.sleep(timeout)
        return False

    def add(self, spec: dict, actor: str = "cli") -> ForgetTarget:
        return self.add_many([spec], actor)[0]

    def find(self, name_or_id: str, tenant: str | None = None) -> ForgetTarget:
        """A target by id or, failing that, by name (case-insensitive) within the tenant."""
        try:
            return self.get(name_or_id)
        except TargetNotFoundError:
            pass
        key = name_key(name_or_id)
        for t in self.list(tenant, include_global=True):
            if name_key(t.name) == key:
                return t
        raise TargetNotFoundError(f"no target with id or name {name_or_id!r}")

    def audit(self, target_id: str | None = None, limit: int = 1000) -> builtins.list[AuditEntry]:
        entries = self.changes_since(0, limit=1_000_000)
        if target_id is not None:
            entries = [e for e in entries if e.target_id == target_id]
        return entries[-limit:]

    def last_seq(self) -> int:
        entries = self.changes_since(0, limit=1_000_000)
        return entries[-1].seq if entries else 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _row_to_target(row) -> ForgetTarget:
    tid, tenant, name, kind, mode, version, created, updated, body = row
    b = json.loads(body)
    return ForgetTarget(
        id=tid, name=name, tenant=tenant or None, aliases=tuple(b.get("aliases", ())), kind=kind,
        description=b.get("description", ""), facts=dict(b.get("facts", {})), texts=tuple(b.get("texts", ())),
        mode=mode, version=int(version), created_at=float(created), updated_at=float(updated),
    )


def _row_to_audit(row) -> AuditEntry:
    seq, at, actor, action, tid, tenant, version, body = row
    return AuditEntry(int(seq), float(at), actor, action, tid, tenant or None,
                      None if version is None else int(version), json.loads(body) if body else None)


_COLS = "id, tenant, name, kind, mode, version, created_at, updated_at, body"


class SQLStore(PolicyStore):
    """The logic both databases share; subclasses provide connections and the dialect."""

    placeholder = "?"

    @abstractmethod
    def _write(self):
        """Context manager: a cursor inside a serialised write transaction."""

    @abstractmethod
    def _read(self):
        """Context manager: a cursor for reading."""

    @abstractmethod
    def _is_unique_violation(self, exc: Exception) -> bool: ...

    def _raise_duplicate(self, exc: Exception):
        """Re-raise ``exc``; a unique-index violation (two writers racing on one name:
        the index decides) becomes DuplicateTargetError."""
        if not isinstance(exc, PolicyError) and self._is_unique_violation(exc):
            raise DuplicateTargetError("a target with that name already exists for the tenant") from None
        raise exc

    def _migrate(self, cur, migrations: tuple[str, ...]) -> None:
        """Bring the schema to ``len(migrations)``, inside the caller's write transaction.
        Migration 1 creates tables only where missing, so a database from before versioning
        is adopted as version 1 untouched."""
        cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at "
                    f"{self._real} NOT NULL)")
        cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        current = int(cur.fetchone()[0])
        if current > len(migrations):
            raise PolicyError(f"the policy store's schema is version {current}, newer than this guardserve knows "
                              f"({len(migrations)}): upgrade guardserve on this host")
        for version in range(current + 1, len(migrations) + 1):
            self._run_script(cur, migrations[version - 1])
            cur.execute(self._q("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)"), (version, time.time()))

    def _run_script(self, cur, script: str) -> None:
        cur.execute(script)

    def schema_version(self) -> int:
        with self._read() as cur:
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            return int(cur.fetchone()[0])

    _real = "REAL"

    def _q(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _audit(self, cur, actor: str, action: str, target: ForgetTarget | None, target_id=None, tenant=None, body=None):
        if target is not None:
            target_id, tenant, version = target.id, target.tenant, target.version
            body = json.dumps(target.to_dict(), ensure_ascii=False)
        else:
            version = None
        cur.execute(
            self._q("INSERT INTO audit (at, actor, action, target_id, tenant, version, body) VALUES (?, ?, ?, ?, ?, ?, ?)"),
            (time.time(), actor, action, target_id, tenant or "", version, body),
        )

    def _check_duplicate(self, cur, tenant: str | None, key: str, exclude_id: str | None = None):
        cur.execute(self._q("SELECT id FROM targets WHERE tenant = ? AND name_key = ?"), (tenant or "", key))
        row = cur.fetchone()
        if row and row[0] != exclude_id:
            scope = f"tenant {tenant!r}" if tenant else "the global scope"
            raise DuplicateTargetError(f"a target named {key!r} already exists in {scope} (id {row[0]})")

    def add_many(self, specs: list[dict], actor: str = "cli") -> list[ForgetTarget]:
        if not isinstance(specs, list) or not specs:
            raise ValidationError("expected one target or a non-empty list of targets")
        clean = []
        for i, spec in enumerate(specs):
            try:
                clean.append(validate_spec(spec))
            except ValidationError as e:
                raise ValidationError(f"target {i}: {e}" if len(specs) > 1 else str(e)) from None
        keys = [(c.get("tenant") or "", name_key(c["name"])) for c in clean]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise DuplicateTargetError(f"the request names {dup[1]!r} twice")
        now = time.time()
        out = []
        try:
            with self._write() as cur:
                for c in clean:
                    self._check_duplicate(cur, c.get("tenant"), name_key(c["name"]))
                    t = ForgetTarget(id=new_target_id(), name=c["name"], tenant=c.get("tenant"),
                                     aliases=tuple(c["aliases"]), kind=c["kind"], description=c["description"],
                                     facts=c["facts"], texts=tuple(c["texts"]), mode=c["mode"], version=1,
                                     created_at=now, updated_at=now)
                    cur.execute(self._q(f"INSERT INTO targets ({_COLS}, name_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                                (t.id, t.tenant or "", t.name, t.kind, t.mode, t.version, now, now,
                                 json.dumps({k: getattr(t, k) for k in _BODY_FIELDS}, ensure_ascii=False),
                                 name_key(t.name)))
                    self._audit(cur, actor, "add", t)
                    out.append(t)
        except Exception as e:
            self._raise_duplicate(e)
        return out

    def get(self, target_id: str) -> ForgetTarget:
        with self._read() as cur:
            cur.execute(self._q(f"SELECT {_COLS} FROM targets WHERE id = ?"), (str(target_id),))
            row = cur.fetchone()
        if row is None:
            raise TargetNotFoundError(f"no target with id {target_id!r}")
        return _row_to_target(row)

    def list(self, tenant: str | None = None, include_global: bool = True) -> list[ForgetTarget]:
        with self._read() as cur:
            if tenant is None:
                cur.execute(f"SELECT {_COLS} FROM targets ORDER BY created_at, id")
            else:
                validate_tenant(tenant)
                tenants = (tenant, "") if include_global else (tenant, tenant)
                cur.execute(self._q(f"SELECT {_COLS} FROM targets WHERE tenant IN (?, ?) ORDER BY created_at, id"), tenants)
            return [_row_to_target(r) for r in cur.fetchall()]

    def update(self, target_id: str, changes: dict, actor: str = "cli", expected_version: int | None = None) -> ForgetTarget:
        clean = validate_spec(changes, partial=True)
        try:
            with self._write() as cur:
                cur.execute(self._q(f"SELECT {_COLS} FROM targets WHERE id = ?"), (str(target_id),))
                row = cur.fetchone()
                if row is None:
                    raise TargetNotFoundError(f"no target with id {target_id!r}")
                old = _row_to_target(row)
                if expected_version is not None and old.version != expected_version:
                    raise VersionConflictError(f"target {target_id} is at version {old.version}, not {expected_version}")
                d = old.to_dict()
                d.update(clean)
                d["version"] = old.version + 1
                d["updated_at"] = max(time.time(), old.updated_at)
                new = ForgetTarget.from_dict(d)
                if "name" in clean:
                    self._check_duplicate(cur, new.tenant, name_key(new.name), exclude_id=new.id)
                cur.execute(
                    self._q("UPDATE targets SET name = ?, name_key = ?, kind = ?, mode = ?, version = ?, updated_at = ?, body = ? "
                            "WHERE id = ? AND version = ?"),
                    (new.name, name_key(new.name), new.kind, new.mode, new.version, new.updated_at,
                     json.dumps({k: getattr(new, k) for k in _BODY_FIELDS}, ensure_ascii=False), new.id, old.version))
                if cur.rowcount != 1:
                    raise VersionConflictError(f"target {target_id} changed during the update; retry")
                self._audit(cur, actor, "update", new)
        except Exception as e:
            self._raise_duplicate(e)
        return new

    def delete(self, target_id: str, actor: str = "cli") -> None:
        with self._write() as cur:
            cur.execute(self._q("SELECT tenant, version FROM targets WHERE id = ?"), (str(target_id),))
            row = cur.fetchone()
            if row is None:
                raise TargetNotFoundError(f"no target with id {target_id!r}")
            cur.execute(self._q("DELETE FROM targets WHERE id = ?"), (str(target_id),))
            cur.execute(
                self._q("INSERT INTO audit (at, actor, action, target_id, tenant, version, body) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                (time.time(), actor, "delete", str(target_id), row[0], int(row[1]), None))

    def changes_since(self, seq: int = 0, limit: int = 10_000) -> builtins.list[AuditEntry]:
        with self._read() as cur:
            cur.execute(self._q("SELECT seq, at, actor, action, target_id, tenant, version, body FROM audit "
                                "WHERE seq > ? ORDER BY seq LIMIT ?"), (int(seq), int(limit)))
            return [_row_to_audit(r) for r in cur.fetchall()]

    def last_seq(self) -> int:
        with self._read() as cur:
            cur.execute("SELECT COALESCE(MAX(seq), 0) FROM audit")
            return int(cur.fetchone()[0])

    def audit(self, target_id: str | None = None, limit: int = 1000) -> builtins.list[AuditEntry]:
        cols = "seq, at, actor, action, target_id, tenant, version, body"
        with self._read() as cur:
            if target_id is None:
                cur.execute(self._q(f"SELECT {cols} FROM audit ORDER BY seq DESC LIMIT ?"), (int(limit),))
            else:
                cur.execute(self._q(f"SELECT {cols} FROM audit WHERE target_id = ? ORDER BY seq DESC LIMIT ?"),
                            (str(target_id), int(limit)))
            return [_row_to_audit(r) for r in reversed(cur.fetchall())]

    def get_setting(self, key: str, default=None):
        with self._read() as cur:
            cur.execute(self._q("SELECT value FROM settings WHERE key = ?"), (key,))
            row = cur.fetchone()
        return default if row is None else json.loads(row[0])

    def set_setting(self, key: str, value, actor: str = "cli") -> None:
        with self._write() as cur:
            self._put_setting(cur, key, value, actor)

    def update_setting(self, key: str, change, actor: str = "cli"):
        # Inside one serialised write transaction: no other writer reads the old value meanwhile.
        with self._write() as cur:
            cur.execute(self._q("SELECT value FROM settings WHERE key = ?"), (key,))
            row = cur.fetchone()
            value, result = change(None if row is None else json.loads(row[0]))
            self._put_setting(cur, key, value, actor)
        return result

    def _put_setting(self, cur, key: str, value, actor: str) -> None:
        cur.execute(self._q("DELETE FROM settings WHERE key = ?"), (key,))
        cur.execute(self._q("INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?)"),
                    (key, json.dumps(value), time.time()))
        cur.execute(
            self._q("INSERT INTO audit (at, actor, action, target_id, tenant, version, body) VALUES (?, ?, ?, ?, ?, ?, ?)"),
            (time.time(), actor, "setting", None, "", None, json.dumps({"key": key, "value": value})))


# Migration 1: the schema as it was before versioning (hence IF NOT EXISTS). Append, never edit.
_SQLITE_MIGRATIONS: tuple[str, ...] = ("""
CREATE TABLE IF NOT EXISTS targets (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, name_key TEXT NOT NULL,
    kind TEXT NOT NULL, mode TEXT NOT NULL, version INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, body TEXT NOT NULL,
    UNIQUE (tenant, name_key));
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    target_id TEXT, tenant TEXT NOT NULL, version INTEGER, body TEXT);
CREATE INDEX IF NOT EXISTS audit_target ON audit (target_id);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
""",)


class SQLiteStore(SQLStore):
    """The embedded default: one file, WAL journal (readers never block the writer),
    writes serialised by ``BEGIN IMMEDIATE`` across processes."""

    def __init__(self, path: str | Path):
        import sqlite3

        self._sqlite3 = sqlite3
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection per store, guarded by a lock: sqlite3 connections are not
        # safe to use from two threads at once.
        self._conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA busy_timeout = 30000")
            self._conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed change survives power loss, not only a process crash.
            self._conn.execute("PRAGMA synchronous = FULL")
        # One transaction: processes opening a new file together cannot see half a schema.
        with self._write() as cur:
            self._migrate(cur, _SQLITE_MIGRATIONS)

    @contextmanager
    def _write(self):
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    @contextmanager
    def _read(self):
        with self._lock:
            cur = self._conn.cursor()
            try:
                yield cur
            finally:
                cur.close()

    def _run_script(self, cur, script: str) -> None:
        # cursor.execute runs one statement, and executescript would commit the transaction
        # first: split on complete statements (a trigger's body holds semicolons).
        statement = ""
        for line in script.splitlines(keepends=True):
            statement += line
            if self._sqlite3.complete_statement(statement):
                cur.execute(statement)
                statement = ""

    def _is_unique_violation(self, exc: Exception) -> bool:
        return isinstance(exc, self._sqlite3.IntegrityError) and "UNIQUE" in str(exc)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"


# Migration 1: the schema as it was before versioning (hence IF NOT EXISTS). Append, never edit.
_PG_MIGRATIONS: tuple[str, ...] = ("""
CREATE TABLE IF NOT EXISTS targets (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, name_key TEXT NOT NULL,
    kind TEXT NOT NULL, mode TEXT NOT NULL, version INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, body TEXT NOT NULL,
    UNIQUE (tenant, name_key));
CREATE TABLE IF NOT EXISTS audit (
    seq BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    target_id TEXT, tenant TEXT NOT NULL, version INTEGER, body TEXT);
CREATE INDEX IF NOT EXISTS audit_target ON audit (target_id);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL);
CREATE OR REPLACE FUNCTION guardserve_audit_append_only() RETURNS trigger AS $$
    BEGIN RAISE EXCEPTION 'the audit log is append-only'; END; $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS audit_append_only ON audit;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION guardserve_audit_append_only();
""",)

# Any constant: replicas starting together take this lock so that only one migrates.
_PG_SCHEMA_LOCK = 0x67756172

# Every committed change is announced here (NOTIFY is delivered at commit, never for a
# rolled-back transaction); replicas LISTEN instead of waiting for their next poll.
PG_CHANNEL = "guardserve_policy"


class PostgresStore(SQLStore):
    """For several replicas sharing one policy.

    Connections come from a pool (``psycopg_pool``) that checks each one before use and
    reconnects with backoff when the database went away; while it cannot, calls fail after
    ``$GUARDSERVE_DB_TIMEOUT_S`` with :class:`StoreUnavailableError` and change nothing.
    Writers take an exclusive lock on the audit table for their (short) transaction, so
    ``seq`` values become visible in order and ``changes_since`` never skips a change
    committed late."""

    placeholder = "%s"
    _real = "DOUBLE PRECISION"

    def __init__(self, url: str, timeout: float | None = None):
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        from guardserve import config

        self._psycopg = psycopg
        self.url = url
        self.timeout = float(timeout if timeout is not None else config.get("GUARDSERVE_DB_TIMEOUT_S"))
        self._unavailable = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
        self._listener: psycopg.Connection | None = None
        self._listener_lock = threading.Lock()
        # The first connection migrates, outside the pool: an unreachable database is reported
        # here with the driver's own reason (refused, unknown host, bad password).
        try:
            with psycopg.connect(url, autocommit=False, connect_timeout=max(1, round(self.timeout))) as conn:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                    self._migrate(cur, _PG_MIGRATIONS)
        except psycopg.OperationalError as e:
            raise StoreUnavailableError(f"cannot reach the policy store: {str(e).strip()}") from None
        # A short reconnect_timeout: the pool retries with backoff (1 s, 2 s, ...) for that long,
        # then gives up until the next caller asks, who starts a fresh attempt at once; so service
        # resumes within seconds of the database returning, however long it was away.
        self._pool = ConnectionPool(
            url, min_size=1, max_size=4, open=True, name="guardserve-policy", timeout=self.timeout,
            reconnect_timeout=max(2.0, 2 * self.timeout), check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(self.timeout))})

    @contextmanager
    def _connection(self):
        try:
            with self._pool.connection() as conn:
                yield conn
        except self._unavailable as e:
            raise StoreUnavailableError(f"the policy store is unreachable ({type(e).__name__}: "
                                        f"{str(e).strip() or 'no connection within the timeout'})") from None

    @contextmanager
    def _write(self):
        with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("LOCK TABLE audit IN EXCLUSIVE MODE")
            yield cur
            cur.execute("SELECT pg_notify(%s, '')", (PG_CHANNEL,))

    @contextmanager
    def _read(self):
        with self._connection() as conn, conn.cursor() as cur:
            yield cur

    def _is_unique_violation(self, exc: Exception) -> bool:
        return isinstance(exc, self._psycopg.errors.UniqueViolation)

    def wait_for_change(self, timeout: float) -> bool:
        """Wait on the store's NOTIFY channel (one connection of its own, reopened after a
        failure). Notifications that arrive between calls are buffered by the connection,
        so none is missed."""
        deadline = time.monotonic() + timeout
        with self._listener_lock:
            try:
                listener = self._listener
                if listener is None or listener.closed:
                    listener = self._listener = self._psycopg.connect(self.url, autocommit=True,
                                                                      connect_timeout=max(1, round(timeout)))
                    listener.execute(f"LISTEN {PG_CHANNEL}")
                left = max(0.0, deadline - time.monotonic())
                for _ in listener.notifies(timeout=left, stop_after=1):
                    return True
                return False
            except self._psycopg.Error:
                if self._listener is not None:
                    self._listener.close()
                self._listener = None
        time.sleep(max(0.0, deadline - time.monotonic()))  # the database is away: the caller polls
        return False

    def close(self) -> None:
        self._pool.close()
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def __repr__(self) -> str:
        return "PostgresStore(<url>)"


def open_store(url: str | None = None) -> PolicyStore:
    """The store named by ``url`` or, without one, by ``$GUARDSERVE_DB``."""
    from guardserve import config

    url = url or config.db_url()
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///"):]
    if "://" in url:
        raise ValidationError(f"unsupported policy store URL {url.split('://')[0]}:// (use a SQLite path or postgresql://)")
    return SQLiteStore(url)
