"""`duch export`: an archive's codes as a (Geo)Parquet file, a PostgreSQL table or a psql script."""
from __future__ import annotations

import click

from duch.pipeline.config.export import ExportConfig

from .options import option, say, user_errors


@click.command()
@click.option("--run", required=True, type=click.Path(), help="An encoded run (its current generation is exported).")
@option(ExportConfig, "bits", help="Which code length to export.")
@click.option("--to", default=None, metavar="FILE.parquet|postgresql://...",
              help="A (Geo)Parquet file, or a PostgreSQL database: postgresql://USER@HOST:PORT/DATABASE.")
@click.option("--to-sql", default=None, type=click.Path(), metavar="FILE.sql",
              help="A psql script that makes the table instead (psql -f FILE.sql).")
@click.option("--with", "include", default="", metavar="continuous,embeddings",
              help="Also export the heads' continuous outputs and/or the encoders' embeddings.")
@click.option("--integer/--no-integer", default=None,
              help="The code as an unsigned 64-bit integer column too (Parquet) [default: for codes of up to 64 "
                   "bits].")
@option(ExportConfig, "table", help="The database table (SCHEMA.TABLE allowed).")
@click.option("--force", is_flag=True, help="Write over a file that exists.")
@click.option("--replace", is_flag=True, help="Drop and make again a table that exists with other columns.")
@option(ExportConfig, "row_group", type=int, help="Rows per Parquet row group and per COPY batch.")
@click.option("--no-verify", is_flag=True, help="Check the code files' sizes only, not their SHA-256.")
@user_errors
def export(include, no_verify, **settings):
    """Export the archive's codes (and tile footprints) to GeoParquet, PostgreSQL/PostGIS or a psql script."""
    from duch.stages.export import export as run_export

    names = tuple(n.strip() for n in include.split(",") if n.strip())
    run_export(ExportConfig(**settings, include=names, verify=not no_verify), echo=say)
