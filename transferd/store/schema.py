"""The database schema, described once; the SQLite and MySQL statements are rendered from it.

Each column and index names the schema version that brought it, so the same
description yields the table a fresh database gets and the steps that bring
an older one up to date.  The column names of the prototype's jobs table are
kept (docs/architecture.md, "The jobs table"); legacy/README.md says how a
prototype database is upgraded.
"""

import dataclasses

from transferd import jobs

# Column kinds and how each dialect spells them.  MySQL keeps text as
# utf8mb4_bin (the table's collation): ids, statuses and lease owners compare
# exactly.  Time columns hold UTC; MySQL's DATETIME(6) has no zone.
KINDS = {
    "id": {"sqlite": "VARCHAR(36)", "mysql": "VARCHAR(36)"},
    "status": {"sqlite": "VARCHAR(16)", "mysql": "VARCHAR(16)"},
    "short": {"sqlite": "VARCHAR(64)", "mysql": "VARCHAR(64)"},
    "name": {"sqlite": "VARCHAR(255)", "mysql": "VARCHAR(255)"},
    "text": {"sqlite": "TEXT", "mysql": "TEXT"},
    "long_text": {"sqlite": "TEXT", "mysql": "MEDIUMTEXT"},
    "count": {"sqlite": "INTEGER", "mysql": "INT"},
    "seconds": {"sqlite": "DOUBLE", "mysql": "DOUBLE"},
    "time": {"sqlite": "TIMESTAMP", "mysql": "DATETIME(6)"},
}


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    kind: str
    since: int = 1  # the schema version that added it
    required: bool = False  # NOT NULL
    default: str = None  # SQL literal

    def definition(self, dialect):
        sql = KINDS[self.kind][dialect]
        if self.required:
            sql += " NOT NULL"
        elif self.kind == "time":
            sql += " NULL"
        if self.default is not None:
            sql += f" DEFAULT {self.default}"
        return sql


@dataclasses.dataclass(frozen=True)
class Index:
    name: str
    columns: tuple
    since: int = 1


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    columns: tuple
    key: tuple = ()
    indexes: tuple = ()
    since: int = 1

    def column(self, name):
        return next(column for column in self.columns if column.name == name)

    def columns_since(self, version):
        return [column for column in self.columns if column.since == version]

    def create(self, dialect, version, if_missing=False):
        """CREATE TABLE as of schema version (the columns it had then; indexes are separate statements)."""
        lines = [f"    {c.name} {c.definition(dialect)}" for c in self.columns if c.since <= version]
        if self.key:
            lines.append(f"    PRIMARY KEY ({', '.join(self.key)})")
        sql = f"CREATE TABLE {'IF NOT EXISTS ' if if_missing else ''}{self.name} (\n" + ",\n".join(lines) + "\n)"
        if dialect == "mysql":
            sql += " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
        return sql

    def create_index(self, index):
        return f"CREATE INDEX {index.name} ON {self.name} ({', '.join(index.columns)})"

    def after(self, name, version):
        """The column before name as of version (MySQL's ADD COLUMN ... AFTER keeps the described order)."""
        names = [column.name for column in self.columns if column.since <= version]
        return names[names.index(name) - 1]


TIME_COLUMNS = tuple(jobs.TIME_COLUMN[state] for state in jobs.STATES)

JOBS = Table(
    "jobs",
    columns=(
        Column("job_id", "id", required=True),
        Column("product_id", "text"),
        Column("status", "status", required=True),
        Column("detailed_status", "text"),
        Column("destination_path", "text"),
        Column("submitter", "text"),
        Column("fts_jobid", "name"),
        Column("fts_details", "text"),
        Column("stager_callback", "short"),  # SHA-256 hex of the current authcode
        Column("stager_path", "text"),
        Column("stager_hostname", "text"),
        Column("stager_status", "text"),
        Column("staged_files", "long_text"),
        Column("stager_request", "name", since=2),
        Column("stage_attempts", "count", required=True, default="0"),
        Column("lease_owner", "short"),
        Column("lease_until", "seconds"),
        Column("poll_owner", "short", since=2),
        Column("poll_until", "seconds", since=2),
    ) + tuple(Column(name, "time") for name in TIME_COLUMNS),
    key=("job_id",),
    indexes=(
        Index("jobs_status_lease", ("status", "lease_until")),
        Index("jobs_status_poll", ("status", "poll_until"), since=2),
    ),
)

SCHEMA_VERSION = Table("schema_version", columns=(Column("version", "count", required=True),))

# Every table transferd keeps, in the order they are created.
TABLES = (JOBS,)

# The prototype's columns (legacy/prototype_schema.sql): a jobs table without
# all of them is not one transferd may alter.
PROTOTYPE_COLUMNS = (
    "job_id", "product_id", "status", "detailed_status", "destination_path", "submitter",
    "fts_jobid", "fts_details", "stager_callback", "stager_path", "stager_hostname",
    "stager_status", "time_submitted", "time_staging", "time_transferring", "time_error",
    "time_success",
)  # fmt: skip

LATEST = max(item.since for table in TABLES for item in (table, *table.columns, *table.indexes))

assert {column.name for column in JOBS.columns} == set(jobs.COLUMNS), "the Job fields are the jobs columns"


def changes(version):
    """What schema version brings: (tables to create, (table, column) to add, (table, index) to create)."""
    created = [table for table in TABLES if table.since == version]
    added = [(table, column) for table in TABLES if table.since < version for column in table.columns_since(version)]
    indexed = [(table, index) for table in TABLES for index in table.indexes if index.since == version]
    return created, added, indexed


def sqlite_migrations():
    """Per schema version, the SQLite statements that bring a database to it (run in one transaction)."""
    migrations = []
    for version in range(1, LATEST + 1):
        created, added, indexed = changes(version)
        steps = [SCHEMA_VERSION.create("sqlite", version, if_missing=True)] if version == 1 else []
        steps += [table.create("sqlite", version) for table in created]
        steps += [f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.definition('sqlite')}"
                  for table, column in added]
        steps += [table.create_index(index) for table, index in indexed]
        migrations.append(steps)
    return migrations
