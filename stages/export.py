"""`duch export`: an encoded archive's codes where users already query them: a (Geo)Parquet file for DuckDB,
GeoPandas and QGIS, a PostgreSQL (PostGIS) table loaded with COPY, or a psql script that makes that table.

It reads the run's current generation once (as search does: no lock; removed items left out) and writes nothing
into the run. A database table exported again after `duch add` or `remove` is brought to the new generation in one
transaction. Each prints a Hamming top-k query over what it wrote, whose order (distance, then `archive_row`) is
duch's own with `ties="order"`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from duch.pipeline import DuchError
from duch.pipeline.config.export import ExportConfig
from duch.pipeline.export.parquet_file import write_parquet
from duch.pipeline.export.queries import duckdb_query, postgres_query
from duch.pipeline.export.rows import ExportSource
from duch.pipeline.run.records import EncodedRun


def export(cfg: ExportConfig, echo: Callable[[str], None] = print) -> dict:
    """Write the export `cfg` asks for; {"rows": {modality: rows}, "generation": n, "seconds": s, "query": SQL}."""
    cfg.validate()
    encoded = EncodedRun.read(cfg.run, " to export")
    if cfg.bits not in encoded.models:
        raise DuchError(f"{encoded.folder} holds codes of {', '.join(map(str, encoded.bits))} bits, not "
                        f"{cfg.bits}; give one of those as `bits`")
    source = ExportSource.open(cfg.run, cfg.bits, cfg.verify)
    source.check_include(cfg.include)
    start = time.perf_counter()
    batches = source.batches(1)
    first = next(batches, None)
    batches.close()
    example = first.columns["codes"][0] if first is not None else None
    if cfg.is_database or cfg.to_sql:
        from duch.pipeline.export.postgres import to_database, to_sql_file

        if cfg.is_database:
            assert cfg.to is not None  # is_database says so
            rows, where, postgis = to_database(source, cfg.to, cfg.table, cfg.include, cfg.replace, cfg.row_group)
        else:
            assert cfg.to_sql is not None  # validate: one of to and to_sql
            rows, postgis = to_sql_file(source, Path(cfg.to_sql), cfg.table, cfg.include, cfg.force, cfg.row_group)
            where = cfg.to_sql
        query = postgres_query(cfg.table, cfg.bits, example, source.places, postgis)
    else:
        assert cfg.to is not None
        rows = write_parquet(source, Path(cfg.to), cfg.include, cfg.with_integer, cfg.row_group, cfg.force)
        where = cfg.to
        query = duckdb_query(cfg.to, cfg.bits, example, cfg.with_integer, source.places)
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{n} {m}" for m, n in rows.items())
    echo(f"export: {sum(rows.values())} rows ({counts}) of generation {source.generation}, {cfg.bits} bits -> "
         f"{where} in {seconds:.1f} s")
    echo(f"export: the top 10 by Hamming distance to the first item's code (duch's order: `ties` order):\n{query}")
    return {"rows": rows, "generation": source.generation, "seconds": seconds, "query": query}
