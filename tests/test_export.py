"""duch export: an archive's codes as GeoParquet read back by pyarrow, GeoPandas and DuckDB, and as a table of a
real PostgreSQL (PostGIS) server, with Hamming top-k queries in those engines that return duch's own neighbours
(`ties="order"`: equal distances in archive order, ORDER BY distance, archive_row)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from duch.cli import main
from duch.pipeline import DuchError
from duch.pipeline.config import AddConfig, CompactConfig, RemoveConfig
from duch.pipeline.config.export import ExportConfig
from duch.pipeline.export.columns import bit_strings, code_ints
from duch.pipeline.retrieval.search import Index
from duch.stages.add import add
from duch.stages.compact import compact
from duch.stages.export import export
from duch.stages.remove import remove

from . import pgkit
from .conftest import ASSETS, REAL_JPEGS, write_caption_json
from .test_scene_search import AIRPLANE, corner_box

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
duckdb = pytest.importorskip("duckdb")


def quiet(_):
    pass


def queries(index: Index, n: int = 50) -> list[tuple[str, str]]:
    """n (item id, target modality) pairs: images searching captions and captions searching images in turn (or
    images searching images where the archive holds no captions)."""
    images = [str(i) for i in index.tables["image"].meta["ids"]]
    if "text" not in index.tables:
        return [(images[i % len(images)], "image") for i in range(n)]
    t = index.tables["text"].meta
    captions = [f"{i}#{c}" for i, c in zip(t["image_id"], t["caption_index"])]
    pairs = [p for pair in zip([(i, "text") for i in images], [(c, "image") for c in captions]) for p in pair]
    pairs += [(c, "image") for c in captions[len(images):]]
    return pairs[:n]


def duch_answers(index: Index, pairs, k: int = 10) -> list:
    return [[(h.id, h.distance) for h in index.search(id=item, modality=target, k=k, ties="order")]
            for item, target in pairs]


def code_of(index: Index, item: str) -> np.ndarray:
    return index.id_query(item).packed


def test_the_parquet_file_reads_back_with_geometry_crs_and_bbox_equal_to_duch_s(scenes, tmp_path):
    geopandas = pytest.importorskip("geopandas")
    path = tmp_path / "tiles.parquet"
    said = []
    export(ExportConfig(run=str(scenes["archive"]), bits=64, to=str(path), row_group=10), echo=said.append)
    index = Index.load(scenes["archive"], bits=64, device="cpu")
    printed = said[-1][said[-1].index("SELECT"):]  # the query it prints, with its bbox test, runs in DuckDB
    first = str(index.tables["image"].meta["ids"][0])
    assert [(i, int(d)) for i, d in duckdb.connect().execute(printed).fetchall()] == [
        (h.id, h.distance) for h in index.search(id=first, k=10, ties="order")]
    meta = index.tables["image"].meta
    table = pq.read_table(path)
    assert table.column("id").to_pylist() == list(meta["ids"]) and table.num_rows == 64
    assert pq.ParquetFile(path).metadata.num_row_groups == 7  # 10 rows a group: written in bounded pieces
    codes = np.asarray(index.tables["image"].codes)
    assert [bytes(c) for c in codes] == table.column("code").to_pylist()
    assert table.column("code_int").to_pylist() == [int.from_bytes(bytes(c), "big") for c in codes]
    assert table.column("archive_row").to_pylist() == list(range(64))
    assert {str(d) for d in table.column("date").to_pylist()} == {"2021-06-03"}
    assert table.column("pixel_window").to_pylist()[list(meta["ids"]).index(AIRPLANE)] == [512, 1280, 256, 256]
    box = table.column("bbox").to_pylist()
    np.testing.assert_array_equal([[b[k] for k in ("xmin", "ymin", "xmax", "ymax")] for b in box], meta["bounds"])
    recorded = json.loads(table.schema.metadata[b"duch"])
    assert recorded["generation"] == 0 and recorded["bits"] == 64 and recorded["rows"] == {"image": 64}
    assert recorded["model_sha256"] == index.archive.encoded[0].models[64].sha256
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]

    frame = geopandas.read_parquet(path)
    assert frame.crs.equals("OGC:CRS84") and frame.crs.to_epsg() is None or frame.crs.equals("OGC:CRS84")
    np.testing.assert_allclose(frame.total_bounds, geo["columns"]["geometry"]["bbox"], rtol=0, atol=0)
    np.testing.assert_array_equal(frame.geometry.bounds.to_numpy(), meta["bounds"])
    for row, polygon in enumerate(frame.geometry):  # the footprint's corners, counterclockwise, closed
        ring = np.asarray(polygon.exterior.coords)
        assert polygon.exterior.is_ccw and len(ring) == 5 and (ring[0] == ring[-1]).all()
        assert sorted(map(tuple, ring[:4])) == sorted(map(tuple, meta["lonlat"][row]))
    hits = index.search(id=AIRPLANE, k=5, ties="order")
    first = frame[frame.id == hits[0].id].iloc[0]
    assert sorted(map(tuple, np.asarray(first.geometry.exterior.coords)[:4])) == \
        sorted(map(tuple, hits[0].place.lonlat))


@pytest.mark.parametrize("integer", [True, False])
def test_duckdb_s_hamming_top_k_over_the_file_is_duch_s_own(encoded_run, tmp_path, integer):
    """16-bit codes of 72 items: many equal distances, which the order by archive_row settles as duch does."""
    path = tmp_path / "codes.parquet"
    export(ExportConfig(run=str(encoded_run), bits=16, to=str(path), integer=integer), echo=quiet)
    index = Index.load(encoded_run, bits=16, device="cpu")
    pairs = queries(index)
    assert len(pairs) == 50 and {t for _, t in pairs} == {"image", "text"}
    db = duckdb.connect()
    found = []
    for item, target in pairs:
        code = code_of(index, item)
        if integer:
            sql = ("SELECT id, bit_count(xor(code_int, ?::UBIGINT)) AS d FROM read_parquet(?) WHERE modality = ? "
                   "ORDER BY d, archive_row LIMIT 10")
            args = [int(code_ints(code)[0]), str(path), target]
        else:
            sql = ("SELECT id, bit_count(xor(code::BIT, from_hex(?)::BIT)) AS d FROM read_parquet(?) "
                   "WHERE modality = ? ORDER BY d, archive_row LIMIT 10")
            args = [bytes(code[0]).hex(), str(path), target]
        found.append([(i, int(d)) for i, d in db.execute(sql, args).fetchall()])
    expected = duch_answers(index, pairs)
    assert found == expected
    assert sum(len({d for _, d in r}) < len(r) for r in expected) > 40  # ties in most answers: their order counted
    assert "code_int" in pq.read_schema(path).names if integer else "code_int" not in pq.read_schema(path).names


def test_the_cli_writes_the_file_prints_a_query_and_refuses_what_it_must(encoded_run, tmp_path):
    path = tmp_path / "codes.parquet"
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--run", str(encoded_run), "--bits", "8", "--to", str(path), "--with",
                                  "continuous,embeddings"])
    assert result.exit_code == 0, result.output
    assert "72 rows (24 image, 48 text) of generation 0, 8 bits" in result.output
    query = result.output[result.output.index("SELECT"):]
    first = duckdb.connect().execute(query).fetchall()
    index = Index.load(encoded_run, bits=8, device="cpu")
    assert [(i, int(d)) for i, d in first] == [(h.id, h.distance) for h in index.search(
        id="0", modality="image", k=10, ties="order")]
    table = pq.read_table(path)
    t = index.tables["text"]
    np.testing.assert_array_equal(np.asarray(table.column("continuous").to_pylist()[24:], np.float32),
                                  np.asarray(t.continuous, np.float32))
    assert table.column("captions").to_pylist()[0] == ["a airplane scene number 0", "airplane seen from above"]
    assert len(table.column("embedding").to_pylist()[0]) == 16
    again = runner.invoke(main, ["export", "--run", str(encoded_run), "--bits", "8", "--to", str(path)])
    assert again.exit_code == 2 and again.output.strip() == f"error: {path} exists; give --force to write over it"
    assert runner.invoke(main, ["export", "--run", str(encoded_run), "--bits", "8", "--to", str(path),
                                "--force"]).exit_code == 0
    wide = runner.invoke(main, ["export", "--run", str(encoded_run), "--bits", "128", "--integer", "--to",
                                str(tmp_path / "w.parquet")])
    assert wide.exit_code == 2 and "--integer codes are 64-bit integers and these codes have 128 bits" in wide.output
    other = runner.invoke(main, ["export", "--run", str(encoded_run), "--bits", "32", "--to",
                                 str(tmp_path / "x.parquet")])
    assert other.exit_code == 2 and "holds codes of 8, 16 bits, not 32; give one of those as --bits" in other.output
    for bad, said in ((["--with", "pixels"], "--with 'pixels': give a comma list of continuous and embeddings"),
                      (["--to", str(tmp_path / "x.csv")], "give a file ending in .parquet or a database")):
        out = runner.invoke(main, ["export", "--run", str(encoded_run), "--bits", "8", "--to",
                                   str(tmp_path / "y.parquet"), *bad])
        assert out.exit_code == 2 and said in out.output, out.output


# ------------------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def database():
    reason = pgkit.why_not()
    if reason:
        pytest.skip(reason)
    try:
        with pgkit.server() as url:
            yield url
    except RuntimeError as e:
        if "did not start" in str(e):
            pytest.skip(str(e)[:300])
        raise


def sql(url: str, query: str, args=()) -> list:
    import psycopg

    with psycopg.connect(url) as conn:
        cur = conn.execute(query, args or None)
        return cur.fetchall() if cur.description else []


def test_sql_hamming_top_k_in_postgresql_is_duch_s_own(encoded_run, database):
    export(ExportConfig(run=str(encoded_run), bits=16, to=database, table="codes16"), echo=quiet)
    index = Index.load(encoded_run, bits=16, device="cpu")
    pairs = queries(index)
    found = [[(i, int(d)) for i, d in sql(
        database, "SELECT id, bit_count(code # %s::bit(16)) AS d FROM codes16 WHERE modality = %s "
        "ORDER BY d, archive_row LIMIT 10", (bit_strings(code_of(index, item))[0], target))] for item, target in pairs]
    assert found == duch_answers(index, pairs)
    assert sql(database, "SELECT count(*), count(captions) FROM codes16") == [(72, 24)]


def test_a_bbox_query_in_postgis_agrees_with_duch_search_bbox(scenes, database, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--run", str(scenes["archive"]), "--bits", "64", "--to", database,
                                  "--table", "tiles"])
    assert result.exit_code == 0, result.output
    assert "ST_Relate(geometry, ST_MakeEnvelope(" in result.output  # PostGIS found: the printed query uses it
    index = Index.load(scenes["archive"], bits=64, device="cpu")
    first = str(index.tables["image"].meta["ids"][0])
    assert [(i, int(d)) for i, d in sql(database, result.output[result.output.index("SELECT"):])] == [
        (h.id, h.distance) for h in index.search(id=first, k=10, ties="order")]
    assert sql(database, "SELECT indexdef FROM pg_indexes WHERE tablename = 'tiles' AND indexdef LIKE '%gist%'")
    box = corner_box()
    ours = runner.invoke(main, ["search", "--run", str(scenes["archive"]), "--bits", "64", "--id", AIRPLANE,
                                "--bbox", ",".join(map(repr, box)), "-k", "64", "--ties", "order", "--json",
                                "--device", "cpu"])
    expected = [(h["id"], h["distance"]) for h in json.loads(ours.stdout)]
    assert 4 < len(expected) < 64
    code = bit_strings(code_of(Index.load(scenes["archive"], bits=64, device="cpu"), AIRPLANE))[0]
    envelope = "ST_MakeEnvelope(%s, %s, %s, %s, 4326)"
    found = sql(database, f"SELECT id, bit_count(code # %s::bit(64)) AS d FROM tiles WHERE geometry && {envelope} "
                f"AND ST_Relate(geometry, {envelope}, 'T********') ORDER BY d, archive_row LIMIT 64",
                (code, *box, *box))
    assert [(i, int(d)) for i, d in found] == expected
    srid, kind = sql(database, "SELECT DISTINCT ST_SRID(geometry), GeometryType(geometry) FROM tiles")[0]
    assert (srid, kind) == (4326, "POLYGON")


def table_rows(url: str, table: str) -> dict:
    rows = sql(url, f"SELECT modality, id, archive_row, code::text FROM {table}")
    return {(m, i): (int(r), b) for m, i, r, b in rows}


def archive_rows(run) -> dict:
    index = Index.load(run, bits=16, device="cpu")
    out = {}
    for modality, table in index.tables.items():
        ids = (table.meta["ids"] if modality == "image" else
               [f"{i}#{c}" for i, c in zip(table.meta["image_id"], table.meta["caption_index"])])
        for row, (item, code) in enumerate(zip(ids, bit_strings(np.asarray(table.codes)))):
            if not index.archive.removed[modality][row]:
                out[(modality, str(item))] = (row, code)
    return out


def test_an_export_after_add_and_remove_leaves_the_table_equal_to_the_archive(encoded_run, database, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    new = tmp_path / "new"
    (new / "images").mkdir(parents=True)
    for i in range(24, 28):
        shutil.copy(ASSETS / REAL_JPEGS[i % len(REAL_JPEGS)], new / "images" / f"{i}.jpg")
    write_caption_json(new, [{"filename": f"{i}.jpg", "classname": "harbor", "sentences": [{"raw": f"new {i}"}]}
                             for i in range(24, 28)])
    cfg = ExportConfig(run=str(run), bits=16, to=database, table="grown")
    export(cfg, echo=quiet)
    assert table_rows(database, "grown") == archive_rows(run)
    add(AddConfig(run=str(run), data=str(new / "dataset.json"), device="cpu", workers=0), progress=False, echo=quiet)
    remove(RemoveConfig(run=str(run), ids=("3", "25")), echo=quiet)
    export(cfg, echo=quiet)
    after = archive_rows(run)
    assert table_rows(database, "grown") == after
    assert ("image", "26") in after and ("image", "3") not in after and ("text", "3#0") not in after
    assert len(after) == 72 + 4 * 2 - 3 - 2  # 4 images of 1 caption added; 3 (2 captions) and 25 removed
    export(ExportConfig(run=str(run), bits=16, to=str(tmp_path / "grown.parquet")), echo=quiet)  # the same rows
    file = pq.read_table(tmp_path / "grown.parquet")
    assert {(m, i): (r, b) for m, i, r, b in zip(*(file.column(c).to_pylist() for c in (
        "modality", "id", "archive_row")), bit_strings(np.array(file.column("code").to_pylist(), "S2").view(
            np.uint8).reshape(-1, 2)))} == after
    assert json.loads(file.schema.metadata[b"duch"])["removed_items"] == 2
    comment = sql(database, "SELECT obj_description('grown'::regclass)")[0][0]
    assert json.loads(comment)["generation"] == 2 and json.loads(comment)["segments"] == [".", "segments/0001"]
    compact(CompactConfig(run=str(run)), echo=quiet)  # rows renumbered: archive_row follows, no row lost
    export(cfg, echo=quiet)
    compacted = archive_rows(run)
    assert table_rows(database, "grown") == compacted and compacted.keys() == after.keys() and compacted != after
    assert json.loads(sql(database, "SELECT obj_description('grown'::regclass)")[0][0])["removed_items"] == 0


def test_the_psql_script_makes_the_same_table(encoded_run, database, tmp_path):
    script = tmp_path / "codes.sql"
    export(ExportConfig(run=str(encoded_run), bits=16, to_sql=str(script), table="from_script",
                        include=("continuous",)), echo=quiet)
    export(ExportConfig(run=str(encoded_run), bits=16, to=database, table="direct", include=("continuous",)),
           echo=quiet)
    subprocess.run([str(pgkit.BIN / "psql"), "-q", "-X", "-d", database, "-f", str(script)], check=True,
                   capture_output=True, timeout=60)
    columns = "modality, id, archive_row, image_id, caption_index, caption, captions, label, path, code, continuous"
    assert sql(database, f"SELECT {columns} FROM from_script ORDER BY 1, 3") == \
        sql(database, f"SELECT {columns} FROM direct ORDER BY 1, 3")
    with pytest.raises(DuchError, match="exists; give `force`"):
        export(ExportConfig(run=str(encoded_run), bits=16, to_sql=str(script)), echo=quiet)


def test_bad_databases_and_tables_are_one_line_each(encoded_run, database, tmp_path):
    runner = CliRunner()
    with pgkit.free_port_url("s3cret-pw") as (url, host, port):
        out = runner.invoke(main, ["export", "--run", str(encoded_run), "--bits", "8", "--to", url])
    assert out.exit_code == 2 and out.output.count("\n") == 1
    assert f"cannot reach the database at {host}:{port}" in out.output and "s3cret-pw" not in out.output
    sql(database, "CREATE TABLE other_schema (x integer)")
    args = ["export", "--run", str(encoded_run), "--bits", "8", "--to", database, "--table", "other_schema"]
    refused = runner.invoke(main, args)
    assert refused.exit_code == 2 and "table other_schema at 127.0.0.1:" in refused.output
    assert "exists with other columns than this export's (x integer); give --replace" in refused.output
    assert sql(database, "SELECT count(*) FROM other_schema") == [(0,)]  # left as it was
    assert runner.invoke(main, [*args, "--replace"]).exit_code == 0
    assert sql(database, "SELECT count(*) FROM other_schema") == [(72,)]


def test_without_the_export_extra_the_error_names_it(encoded_run, tmp_path):
    """pyarrow missing (an import that fails): one line saying which extra to install."""
    code = ("import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None; "
            "from duch.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, "export", "--run", str(encoded_run), "--bits", "8", "--to",
                          str(tmp_path / "a.parquet")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: `duch export` needs pyarrow, which is not installed; install the export extra: "
        "pip install 'duch[export]'")
    assert not (tmp_path / "a.parquet").exists()


def test_the_readme_s_recipes_return_duch_s_hits(scenes, database, tmp_path, monkeypatch):
    """The DuckDB and PostgreSQL queries of the README's "Your codes in other tools", run as written (the file as
    tiles.parquet, the table as duch_codes), against `duch search --ties order` (with the box, for PostgreSQL)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your codes in other tools"):]
    block = section[section.index("```sql") + 6:]
    block = block[:block.index("```")]
    statements = [s for s in ("\n".join(line.split("--")[0] for line in block.splitlines())).split(";") if s.strip()]
    duck, post = statements
    monkeypatch.chdir(tmp_path)
    export(ExportConfig(run=str(scenes["archive"]), bits=64, to="tiles.parquet"), echo=quiet)
    export(ExportConfig(run=str(scenes["archive"]), bits=64, to=database), echo=quiet)
    index = Index.load(scenes["archive"], bits=64, device="cpu")
    expected = [(h.id, h.distance) for h in index.search(id=AIRPLANE, k=10, ties="order")]
    assert [(i, int(d)) for i, d in duckdb.connect().execute(duck).fetchall()] == expected
    from duch.pipeline.retrieval.filters import PlaceFilter, search_places

    boxed, _ = search_places(index, PlaceFilter.parse(bbox="-120.6,37.2,-120.4,37.4"), id=AIRPLANE, k=10,
                             ties="order")
    assert [(i, int(d)) for i, _, d in sql(database, post)] == [(h.id, h.distance) for h in boxed]
    # A text query's code, as the README makes it, in DuckDB: the hits of duch search --text --ties order.
    from duch.pipeline.retrieval.queries import Query

    q = Query.of("text", index.coder.embed_text(["many airplanes"])[0]).packed[0].tobytes()
    found = duckdb.connect().execute(
        "SELECT id, bit_count(xor(code_int, ?::UBIGINT)) AS d FROM 'tiles.parquet' ORDER BY d, archive_row LIMIT 10",
        [int.from_bytes(q, "big")]).fetchall()
    assert [(i, int(d)) for i, d in found] == [(h.id, h.distance) for h in index.search(
        text="many airplanes", k=10, ties="order")]


def test_copy_text_escapes_what_copy_and_arrays_need(database):
    """Tabs, newlines, backslashes, quotes, braces and commas in ids, captions and paths come back as written."""
    from duch.pipeline.export.postgres import copy_rows
    from duch.pipeline.export.rows import Batch

    odd = ["a\tb", "line\nbreak\r", "back\\slash", 'quote"d {x,y}', "", "NULL", "\\N", "ü ☃"]
    n = len(odd)
    batch = Batch("image", "segments/0001", np.arange(n, dtype=np.int64),
                  {"ids": np.array(odd, object), "path": np.array(odd[::-1], object),
                   "label": np.array(odd, object), "codes": np.arange(n * 2, dtype=np.uint8).reshape(n, 2)},
                  captions=[[s, s + "!"] for s in odd])
    cols = [("id", "text"), ("modality", "text"), ("archive_row", "bigint"), ("image_id", "text"),
            ("caption_index", "integer"), ("caption", "text"), ("captions", "text[]"), ("label", "text"),
            ("path", "text"), ("segment", "text"), ("code", "bit(16)")]
    import psycopg

    with psycopg.connect(database) as conn:
        conn.execute("CREATE TEMP TABLE odd (" + ", ".join(f"{c} {k}" for c, k in cols) + ")")
        with conn.cursor().copy("COPY odd FROM STDIN") as copy:
            copy.write(copy_rows(batch, cols))
        back = conn.execute("SELECT id, captions, label, path, segment, caption, code::text FROM odd "
                            "ORDER BY archive_row").fetchall()
    assert back == [(s, [s, s + "!"], s, p, "segments/0001", None, c)
                    for s, p, c in zip(odd, odd[::-1], bit_strings(batch.columns["codes"]))]
