"""Settings of `duch export`: an archive's codes as a (Geo)Parquet file, a PostgreSQL table or a psql script."""
from __future__ import annotations

import re
from dataclasses import dataclass

from duch.pipeline import DuchError

INCLUDES = ("continuous", "embeddings")  # what `include` (--with) may add to every row
DATABASE_SCHEMES = ("postgresql://", "postgres://")
_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}(\.[a-z_][a-z0-9_]{0,62})?$")


@dataclass
class ExportConfig:
    run: str  # a run with a finished encode-archive stage (its current generation is exported)
    bits: int = 64
    to: str | None = None  # FILE.parquet, or a database: postgresql://user@host:port/db
    to_sql: str | None = None  # a psql script that makes the table (`psql -f FILE.sql`)
    include: tuple[str, ...] = ()  # continuous (the heads' outputs), embeddings (the encoders')
    # The code as an unsigned 64-bit integer too (Parquet): None for codes of up to 64 bits, where one fits.
    integer: bool | None = None
    table: str = "duch_codes"  # the database table (schema.table allowed)
    force: bool = False  # a file that exists is written over
    replace: bool = False  # a table that exists with other columns is dropped and made again
    row_group: int = 65_536  # rows per Parquet row group, and per COPY batch
    verify: bool = True  # the code files' SHA-256 against their manifest (sizes are always checked)

    def validate(self) -> None:
        if (self.to is None) == (self.to_sql is None):
            raise DuchError("give one of `to` (FILE.parquet or postgresql://...) and `to_sql` (FILE.sql)")
        if self.to is not None and not (self.is_database or self.to.endswith(".parquet")):
            raise DuchError(f"`to` {self.to!r}: give a file ending in .parquet or a database as "
                            "postgresql://USER@HOST:PORT/DATABASE")
        if self.to_sql is not None and not self.to_sql.endswith(".sql"):
            raise DuchError(f"`to_sql` {self.to_sql!r}: give a file ending in .sql")
        unknown = [name for name in self.include if name not in INCLUDES]
        if unknown:
            raise DuchError(f"`include` {','.join(unknown)!r}: give a comma list of {' and '.join(INCLUDES)}")
        if self.bits < 8 or self.bits % 8:
            raise DuchError(f"`bits` must be a code length of the run (a multiple of 8), got {self.bits}")
        if self.integer and self.bits > 64:
            raise DuchError(f"`integer` codes are 64-bit integers and these codes have {self.bits} bits; leave "
                            "out `integer` (the packed code column holds them, and SQL's bit strings too)")
        if not _TABLE.match(self.table):
            raise DuchError(f"`table` {self.table!r}: give a lower-case SQL name (letters, digits, _), or "
                            "SCHEMA.TABLE")
        if self.row_group < 1:
            raise DuchError(f"`row_group` must be at least 1 row, got {self.row_group}")

    @property
    def is_database(self) -> bool:
        return self.to is not None and self.to.startswith(DATABASE_SCHEMES)

    @property
    def with_integer(self) -> bool:
        return self.bits <= 64 if self.integer is None else self.integer
