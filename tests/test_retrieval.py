"""encode-archive, search and evaluate on a tiny real pipeline: tiny open_clip, real tiles, trained heads."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from duch import cli
from duch.pipeline import DuchError
from duch.pipeline.config import EncodeConfig, EvaluateConfig, ExtractConfig, TrainConfig
from duch.pipeline.formats.codes import open_codes
from duch.pipeline.formats.features import load_features
from duch.pipeline.formats.weights import load_heads
from duch.pipeline.model.coding import encode, image_codes
from duch.pipeline.retrieval.search import Index
from duch.stages.encode_archive import encode_archive
from duch.stages.evaluate import evaluate
from duch.stages.extract import extract
from duch.stages.train_hash import train_hash

from .conftest import ASSETS, REAL_JPEGS, TINY_CLIP

FAST = dict(bits=(8, 16), epochs=3, hidden=32, batch_size=8, eval_every=3, device="cpu")


def quiet(_):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_extract_run):
    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(tiny_extract_run, run)
    train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=quiet)
    return run


@pytest.fixture
def run(trained, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


def image_folder(root, names):
    folder = root / "images"
    (folder / "tiles").mkdir(parents=True)
    for name in names:
        shutil.copy(ASSETS / name, folder / "tiles" / name)
    return folder


def test_codes_are_the_packed_signs_of_the_trained_heads(run):
    result = encode_archive(EncodeConfig(run=str(run), continuous=True, device="cpu"), progress=False, echo=quiet)
    features = load_features(run)
    for bits in (8, 16):
        attrs, tables = open_codes(result.stage_dir / f"codes-{bits}.h5")
        heads = load_heads(run / "train-hash" / f"bits-{bits}" / "model.safetensors", 16, 16, bits, 32)
        # view_ensemble (the default): an image's code is the sign of the head's mean over it and its 2 views.
        h_image = image_codes(heads.image, torch.as_tensor(features.image, dtype=torch.float32),
                              torch.as_tensor(features.views, dtype=torch.float32)).numpy()
        assert not np.allclose(h_image, encode(heads.image, torch.as_tensor(features.image, dtype=torch.float32)))
        assert isinstance(tables["image"].codes, np.memmap) and tables["image"].codes.shape == (24, bits // 8)
        assert (tables["image"].codes == np.packbits(h_image >= 0, axis=1)).all()
        assert np.allclose(tables["image"].continuous, h_image, atol=1e-3)
        assert tables["image"].meta["ids"].tolist() == features.ids.tolist()
        assert len(tables["text"]) == 48 and attrs["bits"] == bits  # two real captions per image
        assert attrs["model_sha256"] == result.manifest["models"][str(bits)]["sha256"] and attrs["image_views"] == 2
    assert result.manifest["image_code"] == {"views": 2, "seed": 0, "augment": load_features(run).manifest[
        "config"]["image_augment"]}
    said = []
    assert not encode_archive(EncodeConfig(run=str(run), continuous=True, device="cpu"), progress=False,
                              echo=said.append).did_work
    assert "up to date" in said[0]


def test_a_model_validated_on_images_alone_codes_images_alone(run):
    """view_ensemble=False (the paper's recipe): image codes from the image's embedding only, as it validated."""
    train_hash(TrainConfig(run=str(run), **FAST, view_ensemble=False), progress=False, echo=quiet)
    result = encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    heads = load_heads(run / "train-hash" / "bits-16" / "model.safetensors", 16, 16, 16, 32)
    h_image = encode(heads.image, torch.as_tensor(load_features(run).image, dtype=torch.float32)).numpy()
    attrs, tables = open_codes(result.stage_dir / "codes-16.h5")
    assert (tables["image"].codes == np.packbits(h_image >= 0, axis=1)).all() and attrs["image_views"] == 0
    assert result.manifest["image_code"] == {"views": 0}
    trained = json.loads((run / "train-hash" / "manifest.json").read_text())["results"]["16"]["map"]
    metrics = evaluate(EvaluateConfig(run=str(run)), echo=quiet).metrics["results"]["16"]["class"]
    assert all(metrics[d]["map"] == pytest.approx(trained[d]) for d in trained)
    # Back to the default: the same weights (bit for bit), but codes made by the old rule are not evaluated.
    train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=quiet)
    with pytest.raises(DuchError, match="image codes were made from the images alone, but the model's view_ensemble"):
        evaluate(EvaluateConfig(run=str(run)), echo=quiet)
    again = encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    assert again.did_work and again.manifest["image_code"]["views"] == 2
    assert evaluate(EvaluateConfig(run=str(run)), echo=quiet).metrics["image_views_averaged"] == 2


def test_a_killed_encode_keeps_finished_code_lengths_and_no_half_file(run, monkeypatch):
    import duch.pipeline.formats.codes as codes

    real_close = codes.CodeWriter.close
    calls = []

    def close_then_die(self):
        calls.append(self.path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while finishing the second file
        real_close(self)

    monkeypatch.setattr(codes.CodeWriter, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    stage = run / "encode-archive"
    # No temporary file, no manifest; the per-shard parts that both code files were written from stay.
    assert sorted(p.name for p in stage.iterdir()) == ["codes-8.h5", "parts"]
    shards = sorted(o["file"] for o in json.loads((run / "extract" / "manifest.json").read_text())["outputs"])
    assert sorted(p.name for p in (stage / "parts").iterdir()) == shards
    monkeypatch.setattr(codes.CodeWriter, "close", real_close)
    said = []
    encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=said.append)
    assert said[:2] == ["encode-archive: 8 bits already encoded, kept",
                        f"encode-archive: resuming, {len(shards)} of {len(shards)} shards already encoded"]
    assert (stage / "manifest.json").exists() and (stage / "codes-16.h5").exists()
    assert not (stage / "parts").exists()


def test_a_new_archive_with_the_same_encoders_is_encoded_and_searchable(run, tmp_path, tiny_clip_spec):
    data = tmp_path / "new"
    image_folder(data, REAL_JPEGS[:3])  # images only: an archive without captions
    archive = tmp_path / "archive-run"
    extract(ExtractConfig(data=str(data / "images"), run=str(archive), image_encoder=tiny_clip_spec,
                          text_encoder=tiny_clip_spec, image_views=0, workers=0, device="cpu"),
            progress=False, echo=quiet)
    said = []
    result = encode_archive(EncodeConfig(run=str(run), archive=str(archive), device="cpu"), progress=False,
                            echo=said.append)
    assert result.stage_dir == archive / "encode-archive"
    # The model averages image codes over views, but this archive has none: said, and coded from the images alone.
    assert "has no augmented image views" in said[0] and result.manifest["image_code"] == {"views": 0}
    _, tables = open_codes(result.stage_dir / "codes-16.h5")
    assert set(tables) == {"image"} and len(tables["image"]) == 3
    hits = Index.load(archive, bits=16, device="cpu").search(text="many planes", k=5)
    assert [h.modality for h in hits] == ["image"] * 3 and {h.path.split("/")[-1] for h in hits} == set(REAL_JPEGS[:3])


def test_an_archive_from_other_encoders_is_refused(run, tmp_path):
    other_cfg = tmp_path / "other-tiny.json"
    other_cfg.write_text(json.dumps({**TINY_CLIP, "embed_dim": 8}))
    data = tmp_path / "new"
    image_folder(data, REAL_JPEGS[:2])
    archive = tmp_path / "archive-run"
    spec = f"open_clip:{other_cfg}:none"
    extract(ExtractConfig(data=str(data / "images"), run=str(archive), image_encoder=spec, text_encoder=spec,
                          image_views=0, workers=0, device="cpu"), progress=False, echo=quiet)
    with pytest.raises(DuchError, match=r"its image embeddings come from open_clip:.*other-tiny.json:none \(8-d\), "
                                        r"but the model .* was trained on open_clip:.*duch-tiny-test.json:none"):
        encode_archive(EncodeConfig(run=str(run), archive=str(archive), device="cpu"), progress=False, echo=quiet)
    assert not (archive / "encode-archive").exists()


def test_search_by_text_image_and_id_matches_a_direct_scan(run, tmp_path, monkeypatch):
    encode_archive(EncodeConfig(run=str(run), continuous=True, device="cpu"), progress=False, echo=quiet)
    index = Index.load(run, bits=16, device="cpu")
    _, tables = open_codes(run / "encode-archive" / "codes-16.h5")
    # By text: the query's code is the head's sign; results are the archive's images by Hamming, ties by order.
    hits = index.search(text="a airplane scene number 3", k=6, ties="order")
    h = index.coder.embed_text(["a airplane scene number 3"])
    code = np.packbits(h >= 0, axis=1)
    from duch.pipeline.model.coding import unpack_codes
    from duch.pipeline.retrieval.hamming import hamming
    from duch.pipeline.retrieval.metrics import query_adaptive_ranking, weighted_distances

    d = hamming(code, tables["image"].codes)[0]
    assert [h.row for h in hits] == np.argsort(d, kind="stable")[:6].tolist()
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    assert all(h.modality == "image" and h.path.endswith(".jpg") and h.label for h in hits)
    # The default: equal distances by the query's confidence on the differing bits, over the whole archive.
    weighted = weighted_distances(h, unpack_codes(tables["image"].codes, 16))
    expected = query_adaptive_ranking(d[None], weighted)[0]
    from duch.pipeline.retrieval import ranking

    for first_shortlist in (256, 0):  # 0: the scan asked again for 4x more while the k-th distance goes on
        monkeypatch.setattr(ranking, "ADAPTIVE_SHORTLIST", first_shortlist)
        for k in (1, 6, 30):
            adaptive = index.search(text="a airplane scene number 3", k=k)
            assert [h.row for h in adaptive] == expected[:k].tolist()
            assert [h.score for h in adaptive] == pytest.approx((weighted[0, expected[:k]] / 1024).tolist())
    monkeypatch.undo()
    # By an image file: a copy of that tile (items 0, 5, 10, ...) at distance 0. Under its archive name, 0.jpg, its
    # views are drawn as item 0's were, so it gets item 0's code.
    image_hits = index.search(image=ASSETS / REAL_JPEGS[0], k=3, modality="image")
    assert image_hits[0].distance == 0 and int(image_hits[0].id) % len(REAL_JPEGS) == 0
    as_item = tmp_path / "0.jpg"
    shutil.copy(ASSETS / REAL_JPEGS[0], as_item)
    assert np.allclose(index.coder.embed_image([as_item])[0], tables["image"].continuous[0], atol=2e-3)
    hit = index.search(image=as_item, k=1, modality="image")[0]
    assert (hit.id, hit.distance) == ("0", 0)
    # By id: captions by default; re-ranked by cosine within a Hamming shortlist.
    by_id = index.search(id="0", k=4, rerank_top=10)
    assert all(h.modality == "text" and h.caption for h in by_id)
    assert [h.score for h in by_id] == sorted((h.score for h in by_id), reverse=True)
    assert index.search(id="0#1", k=1, modality="text")[0].id == "0#1"  # a caption finds itself first
    with pytest.raises(DuchError, match="is not in the archive"):
        index.search(id="no-such-item")


def test_a_moved_run_tree_stays_searchable(run, tmp_path):
    """The encode-archive manifest holds its paths relative to its own folder, so a run copied or moved as a whole
    (to another disk, another machine) is searched as it was."""
    encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    before = [h.row for h in Index.load(run, bits=16, device="cpu").search(text="a harbor", k=5)]
    manifest = json.loads((run / "encode-archive" / "manifest.json").read_text())
    assert manifest["archive_run"] == ".." and manifest["model_run"] == ".."
    assert manifest["models"]["16"]["file"] == "../train-hash/bits-16/model.safetensors"
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(run, moved)
    index = Index.load(moved, bits=16, device="cpu")
    assert [h.row for h in index.search(text="a harbor", k=5)] == before
    assert index.images_dir == Path(load_features(moved).manifest["dataset"]["images_dir"])


def test_a_model_changed_after_encoding_is_named_with_its_fix_and_the_fix_works(run):
    encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    model = run / "train-hash" / "bits-16" / "model.safetensors"
    original = model.read_bytes()
    model.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(DuchError) as error:
        Index.load(run, bits=16, device="cpu").search(text="a harbor", k=3)
    assert str(error.value) == (f"{model} differs from the file its train-hash manifest lists; run the "
                                f"train-hash stage on {run} again (with the settings it was trained with): it trains "
                                "that code length again and keeps the others")
    assert train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=quiet).did_work
    assert model.read_bytes() == original
    assert len(Index.load(run, bits=16, device="cpu").search(text="a harbor", k=3)) == 3


def test_rerank_needs_continuous_outputs(run):
    encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    with pytest.raises(DuchError, match="`rerank_top` needs the continuous outputs"):
        Index.load(run, bits=8, device="cpu").search(text="harbor", rerank_top=5)


def test_evaluate_reproduces_train_hash_validation_and_writes_plots(run):
    encode_archive(EncodeConfig(run=str(run), continuous=True, device="cpu"), progress=False, echo=quiet)
    said = []
    result = evaluate(EvaluateConfig(run=str(run), rerank=5), echo=said.append)
    trained = json.loads((run / "train-hash" / "manifest.json").read_text())["results"]
    for bits in ("8", "16"):
        metrics = result.metrics["results"][bits]
        for direction in ("I->T", "T->I", "I->I", "T->T"):
            assert metrics["class"][direction]["map"] == pytest.approx(trained[bits]["map"][direction])
            assert set(metrics["class"][direction]["map_rerank"]) == {"reference", "textbook"}
            assert (metrics["class"][direction]["map_adaptive"]
                    == pytest.approx(trained[bits]["map_adaptive"][direction]))
            per_class = metrics["class"][direction]["map_per_class"]["reference"]
            values = list(per_class.values())
            assert values == sorted(values) and min(values) <= metrics["class"][direction]["map"]["reference"]
        inst = metrics["instance"]
        assert (inst["images"], inst["captions"]) == (2, 4)  # the 2 query images and their 2 captions each
        assert set(inst) >= {"hamming", "adaptive", "rerank", "continuous"}
    for name in ("metrics.json", "table.md", "pr_curves.png", "precision_at_k.png", "manifest.json"):
        assert (run / "evaluate" / name).stat().st_size > 0
    assert (run / "evaluate" / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| method | I->T 8 / 16 bits | T->I 8 / 16 bits |" in said[0]
    assert "lowest query classes by reference mAP@20" in said[0]


def test_cli_encode_search_evaluate(run):
    runner = CliRunner()
    out = runner.invoke(cli.main, ["encode-archive", "--run", str(run), "--continuous", "--device", "cpu",
                                   "--no-progress"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(cli.main, ["search", "--run", str(run), "--bits", "16", "--text", "harbor", "-k", "3",
                                   "--json", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    hits = json.loads(out.output)
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["modality"] == "image" for h in hits)
    out = runner.invoke(cli.main, ["search", "--run", str(run), "--bits", "16", "--id", "5", "--device", "cpu"])
    assert out.exit_code == 0 and out.output.count("d=") == 10
    out = runner.invoke(cli.main, ["evaluate", "--run", str(run), "--rerank", "5"])
    assert out.exit_code == 0 and "instance-level Recall@K" in out.output and "pr_curves.png" in out.output
    bad = runner.invoke(cli.main, ["search", "--run", str(run), "--bits", "24", "--text", "x"])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and "not 24" in bad.output
    bad = runner.invoke(cli.main, ["encode-archive", "--run", str(run / "nowhere")])
    assert bad.exit_code == 2 and "no finished train-hash stage" in bad.output


def test_faiss_and_numpy_backends_return_the_same_rows(run):
    encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    by = {b: Index.load(run, bits=16, device="cpu", backend=b) for b in ("numpy", "faiss")}
    for query in ("a harbor scene", "court seen from above"):
        rows = {b: [(h.row, h.distance) for h in index.search(text=query, k=20)] for b, index in by.items()}
        assert rows["numpy"] == rows["faiss"]
    codes = open_codes(run / "encode-archive" / "codes-16.h5")[1]["text"].codes[:5]
    a, b = (by[x].scan.topk(codes, "image", 30) for x in ("numpy", "faiss"))
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_faiss_index_files_are_written_and_used_by_search(run, kind):
    result = encode_archive(EncodeConfig(run=str(run), index=kind, device="cpu"), progress=False, echo=quiet)
    files = result.manifest["index"]["files"]
    assert set(files) == {"8", "16"} and set(files["16"]) == {"image", "text"}
    assert {o["file"] for o in result.manifest["outputs"]} >= {"index-16-image.faiss", "index-8-text.faiss"}
    with_index = Index.load(run, bits=16, device="cpu")
    assert with_index.scan.faiss_file("image").name == "index-16-image.faiss"
    exact = Index.load(run, bits=16, device="cpu", backend="numpy")
    got = [(h.row, h.distance) for h in with_index.search(text="harbor", k=24)]
    want = [(h.row, h.distance) for h in exact.search(text="harbor", k=24)]
    if kind == "flat":
        assert got == want
    else:  # approximate, but on 24 items the graph finds them all, with true distances
        assert sorted(d for _, d in got) == sorted(d for _, d in want) and len(got) == 24
    plain = encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    assert plain.manifest["index"] is None and not list(plain.stage_dir.glob("*.faiss"))


@pytest.mark.parametrize("how", ["missing", "unlisted"])
def test_a_model_file_gone_is_named_with_its_fix_and_the_fix_works(run, how):
    """A model the train-hash manifest should list but that is not on disk (or not in its outputs) is one error
    naming the file and the fix; that fix, a rerun of train-hash, trains that code length again, the same
    weights, and keeps the other."""
    stage = run / "train-hash"
    model = stage / "bits-16" / "model.safetensors"
    original = model.read_bytes()
    if how == "missing":
        model.unlink()
        problem = f"{model} is missing"
    else:
        manifest = json.loads((stage / "manifest.json").read_text())
        manifest["outputs"] = [o for o in manifest["outputs"] if o["file"] != "bits-16/model.safetensors"]
        (stage / "manifest.json").write_text(json.dumps(manifest))
        problem = f"{model} is not listed in the outputs of {stage / 'manifest.json'}"
    fix = (f"run the train-hash stage on {run} again (with the settings it was trained with): it trains that code "
           "length again and keeps the others")
    with pytest.raises(DuchError) as error:
        encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    assert str(error.value) == f"{problem}; {fix}"

    said = []
    assert train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=said.append).did_work
    assert said[:2] == [f"train-hash: {model} is missing, unlisted or does not match its checksum; training 16 bits "
                        "again", "train-hash: 8 bits already trained, kept"]
    assert model.read_bytes() == original
    assert encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet).did_work


@pytest.mark.parametrize("edit, problem", [("no basis", "no basis.extract"),
                                           ("bits not a list", "config.bits holds int"),
                                           ("config not an object", "config holds str")])
def test_a_malformed_train_hash_manifest_is_one_error_with_its_fix(run, edit, problem):
    stage = run / "train-hash"
    manifest = json.loads((stage / "manifest.json").read_text())
    if edit == "no basis":
        del manifest["basis"]
    elif edit == "bits not a list":
        manifest["config"]["bits"] = 16
    else:
        manifest["config"] = "bits 16"
    (stage / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DuchError) as error:
        encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    # What every stage reads is checked as the manifest is read (pipeline/run/manifest.REQUIRED); the rest as used.
    message = str(error.value)
    assert message.startswith(f"{stage / 'manifest.json'}: unreadable manifest ({problem}")
    assert message.endswith("; redo the stage with `force`") and "\n" not in message


def test_an_altered_shard_is_detected_before_it_is_read(run):
    shard = run / "extract" / "image-00001.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte, the size unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(DuchError, match=r"image-00001.h5 does not match the checksum in .*manifest.json "
                                        r"\(truncated or altered\); rerun `duch extract`"):
        encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    shard.write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(DuchError, match="truncated or altered"):
        load_features(run)
    shard.unlink()
    with pytest.raises(DuchError, match=r"image-00001.h5 is missing; rerun `duch extract`"):
        load_features(run)


def test_altered_code_files_are_refused_by_search_and_evaluate_and_rewritten_by_a_rerun(run):
    """Code files and faiss indexes are checked against the encode-archive manifest where they are opened; the
    rerun the message names writes the damaged file again, and only it."""
    encode_archive(EncodeConfig(run=str(run), continuous=True, index="flat", device="cpu"), progress=False,
                   echo=quiet)
    evaluate(EvaluateConfig(run=str(run), bits=(16,)), progress=False, echo=quiet)
    stage = run / "encode-archive"
    codes = stage / "codes-16.h5"
    original = codes.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF  # same size
    codes.write_bytes(bytes(data))
    refused = r"codes-16.h5 does not match the checksum in .*manifest.json \(truncated or altered\); rerun `duch " \
              r"encode-archive`"
    with pytest.raises(DuchError, match=refused):
        Index.load(run, bits=16, device="cpu")
    with pytest.raises(DuchError, match=refused):
        evaluate(EvaluateConfig(run=str(run), bits=(16,)), progress=False, echo=quiet)
    Index.load(run, bits=16, device="cpu", verify=False)  # sizes only: for billions of codes
    codes.write_bytes(bytes(data[:-10]))
    with pytest.raises(DuchError, match=refused):
        Index.load(run, bits=16, device="cpu", verify=False)
    index_file = stage / "index-8-image.faiss"
    index_file.write_bytes(index_file.read_bytes()[:-1])
    with pytest.raises(DuchError, match=r"index-8-image.faiss does not match the checksum"):
        Index.load(run, bits=8, device="cpu").search(text="harbor", k=3)
    kept = (stage / "codes-8.h5").stat().st_mtime_ns
    said = []
    encode_archive(EncodeConfig(run=str(run), continuous=True, index="flat", device="cpu"), progress=False,
                   echo=said.append)
    assert sorted(s for s in said if "does not match" in s) == [
        f"encode-archive: {codes} is missing or does not match its checksum; writing it again",
        f"encode-archive: {index_file} is missing or does not match its checksum; writing it again"]
    assert codes.read_bytes() == original and (stage / "codes-8.h5").stat().st_mtime_ns == kept
    Index.load(run, bits=8, device="cpu").search(text="harbor", k=3)
    evaluate(EvaluateConfig(run=str(run), bits=(16,)), progress=False, echo=quiet)


def test_an_extract_rerun_writes_an_altered_shard_again(run):
    """The fix the error above names works: the finished extract, rerun, finds the shard that no longer matches its
    checksum (same size, one byte flipped), writes that one shard again, and the run reads as before."""
    stage = run / "extract"
    manifest = json.loads((stage / "manifest.json").read_text())
    shard = stage / "image-00001.h5"
    original = shard.read_bytes()
    data = bytearray(original)
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    others = {p.name: p.stat().st_mtime_ns for p in stage.glob("*.h5") if p != shard}
    said = []
    result = extract(ExtractConfig(**{**manifest["config"], "run": str(run)}), progress=False, echo=said.append)
    assert result.did_work
    assert f"extract: {shard} is missing or does not match its checksum; writing it again" in said
    assert shard.read_bytes() == original
    assert {p.name: p.stat().st_mtime_ns for p in stage.glob("*.h5") if p != shard} == others  # the rest kept
    assert [o["sha256"] for o in result.manifest["outputs"]] == [o["sha256"] for o in manifest["outputs"]]
    load_features(run)


def test_a_filter_applies_before_the_top_k_and_never_shrinks_it(run):
    """A filter (say, one class) keeps the search exact among the items it lets through: the top k of those,
    not the top k of all with the others dropped after (which could leave fewer than k)."""
    from duch.pipeline.model.coding import unpack_codes
    from duch.pipeline.retrieval.hamming import hamming
    from duch.pipeline.retrieval.metrics import query_adaptive_ranking, weighted_distances

    encode_archive(EncodeConfig(run=str(run), continuous=True, device="cpu"), progress=False, echo=quiet)
    _, tables = open_codes(run / "encode-archive" / "codes-16.h5")
    labels = np.asarray(tables["image"].meta["label"]).astype(str)
    mask = labels == "harbor"
    allowed = np.flatnonzero(mask)
    query = "a airplane scene number 3"
    for backend in ("numpy", "faiss"):
        index = Index.load(run, bits=16, device="cpu", backend=backend)
        h = index.coder.embed_text([query])
        d = hamming(np.packbits(h >= 0, axis=1), tables["image"].codes)[0]
        by_order = index.search(text=query, k=len(allowed) + 5, ties="order", where=mask)
        assert [x.row for x in by_order] == allowed[np.argsort(d[allowed], kind="stable")].tolist()  # all, no more
        assert {x.label for x in by_order} == {"harbor"}
        weighted = weighted_distances(h, unpack_codes(tables["image"].codes, 16))[:, allowed]
        expected = allowed[query_adaptive_ranking(d[allowed][None], weighted)[0]]
        for k in (1, 3, len(allowed)):
            assert [x.row for x in index.search(text=query, k=k, where=mask)] == expected[:k].tolist()
        reranked = index.search(text=query, k=3, rerank_top=len(allowed), where=mask)
        assert {x.row for x in reranked} <= set(allowed.tolist()) and len(reranked) == 3
        assert index.search(text=query, k=5, where=np.zeros(len(labels), bool)) == []
    with pytest.raises(DuchError, match="needs one value per item"):
        index.search(text=query, k=3, where=mask[:-1])
