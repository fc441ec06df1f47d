import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from duch import cli
from duch.pipeline import DuchError
from duch.pipeline.config import ExtractConfig
from duch.pipeline.formats.shards import read_shard
from duch.stages.extract import extract

from .conftest import ASSETS


def config(data, run, spec, **kw):
    defaults = dict(image_encoder=spec, text_encoder=spec, image_views=2, shard_size=2, batch_size=2,
                    text_batch_size=4, workers=0, device="cpu")
    return ExtractConfig(data=str(data), run=str(run), **(defaults | kw))


def quiet(_):
    pass


def shard_arrays(stage):
    return {p.name: read_shard(p) for p in sorted(stage.glob("*.h5"))}


def assert_same_shards(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert np.array_equal(a[name][key], b[name][key]), (name, key)


def test_extract_writes_shards_views_and_manifest(caption_dataset, tmp_path, tiny_clip_spec):
    result = extract(config(caption_dataset, tmp_path / "run", tiny_clip_spec), progress=False, echo=quiet)
    stage = tmp_path / "run" / "extract"
    assert result.did_work and result.stage_dir == stage
    names = sorted(p.name for p in stage.glob("*.h5"))
    # 5 images in shards of 2; 3+3+1(+1 rewrite)+3+3 = 14 caption rows in shards of 2.
    assert names == [f"image-0000{k}.h5" for k in range(3)] + [f"text-0000{k}.h5" for k in range(7)]

    first = read_shard(stage / "image-00000.h5")
    assert list(first["ids"]) == ["102", "1003"]
    assert list(first["label"]) == ["airplane", "harbor"] and list(first["split"]) == ["train", "train"]
    assert first["emb"].shape == (2, 16) and first["emb"].dtype == np.float16
    assert first["views"].shape == (2, 2, 16)
    assert not np.array_equal(first["views"][:, 0], first["views"][:, 1])  # two different augmentations
    assert not np.array_equal(first["emb"], first["views"][:, 0])

    texts = [read_shard(stage / f"text-0000{k}.h5") for k in range(7)]
    image_ids = np.concatenate([t["image_id"] for t in texts])
    augmented = np.concatenate([t["augmented"] for t in texts])
    assert list(image_ids[augmented]) == ["2001"]  # the single-caption image got a rule-based second view
    rewrite = np.concatenate([t["text"] for t in texts])[augmented][0]
    assert rewrite != "caption 0 of image 2001.jpg with many planes"
    assert np.concatenate([t["caption_index"] for t in texts]).tolist()[:4] == [0, 1, 2, 0]

    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["schema"] == 1 and manifest["stage"] == "extract"
    assert manifest["counts"] == {"items": 5, "images": 5, "image_views": 2, "captions": 13,
                                  "augmented_captions": 1, "rejects": 0, "truncated_captions": 0,
                                  "cleaned_captions": 0, "capped_captions": 0, "dropped_captions": 0}
    assert manifest["encoders"]["image"]["dim"] == 16
    assert manifest["versions"]["torch"] and manifest["basis"]["inputs"]["annotation_sha256"]
    assert {o["file"] for o in manifest["outputs"]} == set(names)
    assert all(len(o["sha256"]) == 64 for o in manifest["outputs"])
    assert "images_per_s" in manifest["timings"] and "captions_per_s" in manifest["timings"]


def test_rerun_does_nothing_and_changed_settings_are_stale(caption_dataset, tmp_path, tiny_clip_spec):
    cfg = config(caption_dataset, tmp_path / "run", tiny_clip_spec)
    extract(cfg, progress=False, echo=quiet)
    stage = tmp_path / "run" / "extract"
    mtimes = {p.name: p.stat().st_mtime_ns for p in stage.iterdir()}
    said = []
    again = extract(cfg, progress=False, echo=said.append)
    assert not again.did_work and "up to date" in said[0]
    assert {p.name: p.stat().st_mtime_ns for p in stage.iterdir()} == mtimes

    with pytest.raises(DuchError, match=r"other settings or inputs \(changed: settings.image_views: 2 -> 3"):
        extract(config(caption_dataset, tmp_path / "run", tiny_clip_spec, image_views=3), progress=False, echo=quiet)
    # Runtime knobs do not make a run stale.
    assert not extract(config(caption_dataset, tmp_path / "run", tiny_clip_spec, batch_size=3),
                       progress=False, echo=quiet).did_work
    # Changed inputs do.
    shutil.copy(ASSETS / "102.jpg", caption_dataset / "images" / "1003.jpg")
    with pytest.raises(DuchError, match="images_listing_sha256"):
        extract(cfg, progress=False, echo=quiet)
    forced = extract(config(caption_dataset, tmp_path / "run", tiny_clip_spec, image_views=3), force=True,
                     progress=False, echo=quiet)
    assert forced.did_work and read_shard(stage / "image-00000.h5")["views"].shape == (2, 3, 16)


def test_a_copied_archive_with_new_modification_times_is_still_up_to_date(caption_dataset, tmp_path,
                                                                           tiny_clip_spec):
    cfg = config(caption_dataset, tmp_path / "run", tiny_clip_spec)
    first = extract(cfg, progress=False, echo=quiet)
    stage = tmp_path / "run" / "extract"
    shards = {p.name: p.stat().st_mtime_ns for p in stage.glob("*.h5")}
    images = sorted((caption_dataset / "images").iterdir())
    for image in images:  # as `cp` without -p leaves them
        os.utime(image, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    said = []
    assert not extract(cfg, progress=False, echo=said.append).did_work
    assert "comparing the contents of 5 images" in said[0] and "contents are unchanged" in said[1]
    assert "up to date" in said[2]
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["fingerprint"] == first.manifest["fingerprint"]  # later stages stay up to date
    assert len(manifest["confirmed_listings"]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in stage.glob("*.h5")} == shards
    said = []
    assert not extract(cfg, progress=False, echo=said.append).did_work and "up to date" in said[0]  # no re-read

    # A run made before the digest existed cannot tell, and says why.
    from duch.pipeline.run.manifest import write_manifest
    write_manifest(stage, {k: v for k, v in manifest.items() if k not in ("images_content_sha256",
                                                                          "confirmed_listings")})
    os.utime(images[1], ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    with pytest.raises(DuchError, match="made before extract kept a digest of the images' bytes"):
        extract(cfg, progress=False, echo=quiet)
    write_manifest(stage, manifest)

    # The same names and sizes but other bytes: stale, as before.
    data = bytearray(images[0].read_bytes())
    data[-3] ^= 0xFF
    images[0].write_bytes(bytes(data))
    with pytest.raises(DuchError, match="images_listing_sha256"):
        extract(cfg, progress=False, echo=quiet)
    assert {p.name: p.stat().st_mtime_ns for p in stage.glob("*.h5")} == shards  # nothing lost


def test_a_rerun_missing_only_caption_shards_counts_every_finished_shard(caption_dataset, tmp_path, tiny_clip_spec):
    run = tmp_path / "run"
    extract(config(caption_dataset, run, tiny_clip_spec), progress=False, echo=quiet)
    stage = run / "extract"
    total = len(list(stage.glob("*.h5")))
    (stage / "manifest.json").unlink()
    (stage / "text-00004.h5").unlink()  # every image shard is finished; one caption shard is not

    said = []
    extract(config(caption_dataset, run, tiny_clip_spec), progress=False, echo=said.append)
    assert said[0] == f"extract: resuming, {total - 1} of {total} shards already finished"


def test_resume_after_crash_redoes_only_missing_shards(caption_dataset, tmp_path, tiny_clip_spec):
    full = tmp_path / "full"
    extract(config(caption_dataset, full, tiny_clip_spec), progress=False, echo=quiet)
    expected = shard_arrays(full / "extract")

    # A crash: the manifest never written, two shards lost, one half-written temp file left behind.
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    stage = crashed / "extract"
    (stage / "manifest.json").unlink()
    (stage / "image-00001.h5").unlink()
    (stage / "text-00004.h5").rename(stage / ".text-00004.h5.tmp")
    kept = {p.name: p.stat().st_mtime_ns for p in stage.glob("*.h5")}

    said = []
    result = extract(config(caption_dataset, crashed, tiny_clip_spec), progress=False, echo=said.append)
    assert result.did_work and said[0] == "extract: resuming, 8 of 10 shards already finished"
    assert {n: (stage / n).stat().st_mtime_ns for n in kept} == kept  # finished shards untouched
    assert not list(stage.glob(".*.tmp"))
    assert_same_shards(shard_arrays(stage), expected)  # bitwise equal to the uninterrupted run
    assert result.manifest["counts"]["images"] == 5


def test_the_manifest_counts_the_captions_the_tokenizer_truncates_whichever_shards_a_session_wrote(
        caption_dataset, tmp_path, tiny_clip_spec):
    """Tiny CLIP reads 16 tokens. Three real captions are longer; so is the rule-based rewrite of the long single
    caption, which is not counted (it is no caption of the dataset's). A resumed run whose text shards were all
    written before counts the same, and so does an up-to-date rerun."""
    from duch.pipeline.encoders import parse_spec
    from duch.pipeline.encoders.context import count_truncated
    from duch.pipeline.formats.features import load_features

    long = "a harbor with many boats moored along the long pier beside a road and some green trees " * 2
    annotation = caption_dataset / "dataset.json"
    data = json.loads(annotation.read_text())
    for i, k in ((0, 1), (2, 0), (3, 2)):  # image 2 has one caption: its rewrite is long too
        data["images"][i]["sentences"][k]["raw"] = long
    annotation.write_text(json.dumps(data))
    said = []
    result = extract(config(caption_dataset, tmp_path / "run", tiny_clip_spec), progress=False, echo=said.append)
    assert result.manifest["counts"]["truncated_captions"] == 3
    assert "extract: note: 3 of 13 captions are longer than the text encoder reads; each is embedded from its " \
           "first tokens only" in said
    features = load_features(tmp_path / "run")
    spec = parse_spec(tiny_clip_spec, "text")
    assert count_truncated(spec, features.text[features.text_augmented]) == 1  # the long rewrite, left out
    assert count_truncated(spec, features.text[~features.text_augmented]) == 3

    stage = tmp_path / "run" / "extract"
    (stage / "manifest.json").unlink()  # a crash after every text shard was written, one image shard not
    (stage / "image-00002.h5").unlink()
    resumed = extract(config(caption_dataset, tmp_path / "run", tiny_clip_spec), progress=False, echo=quiet)
    assert resumed.did_work and resumed.manifest["counts"] == result.manifest["counts"]
    again = extract(config(caption_dataset, tmp_path / "run", tiny_clip_spec), progress=False, echo=quiet)
    assert not again.did_work and again.manifest["counts"]["truncated_captions"] == 3


def test_worker_processes_give_identical_embeddings(caption_dataset, tmp_path, tiny_clip_spec):
    extract(config(caption_dataset, tmp_path / "a", tiny_clip_spec, workers=0), progress=False, echo=quiet)
    extract(config(caption_dataset, tmp_path / "b", tiny_clip_spec, workers=2, batch_size=3), progress=False,
            echo=quiet)
    assert_same_shards(shard_arrays(tmp_path / "a" / "extract"), shard_arrays(tmp_path / "b" / "extract"))


def test_bad_items_are_rejected_and_the_run_goes_on(caption_dataset, tmp_path, tiny_clip_spec):
    images = caption_dataset / "images"
    data = (ASSETS / "102.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[:3000])
    (images / "fake.jpg").write_text("not an image")
    doc = json.loads((caption_dataset / "dataset.json").read_text())
    doc["images"] += [
        {"filename": "cut.jpg", "sentences": [{"raw": "a cut file"}]},
        {"filename": "gone.jpg", "sentences": [{"raw": "a lost file"}, {"raw": ""}]},
        {"filename": "fake.jpg", "sentences": [{"raw": "text in disguise"}]},
    ]
    (caption_dataset / "dataset.json").write_text(json.dumps(doc))

    said = []
    result = extract(config(caption_dataset, tmp_path / "run", tiny_clip_spec), progress=False, echo=said.append)
    rejects = {r["id"]: r["reason"] for r in result.manifest["rejects"]}
    assert rejects == {"gone#1": "empty caption", "cut": "truncated image file", "gone": "missing file",
                       "fake": "not a recognised image (expected JPEG, PNG or TIFF)"}
    assert result.manifest["counts"]["images"] == 5 and result.manifest["counts"]["rejects"] == 4
    assert "warning: 4 items skipped (and the 3 captions of the rejected images)" in said[-1]
    ids = np.concatenate([read_shard(p)["ids"] for p in sorted((tmp_path / "run" / "extract").glob("image-*.h5"))])
    assert list(ids) == ["102", "1003", "2001", "156", "497"]
    # A caption goes with its image: none of the rejected images' captions is embedded, counted or coded.
    text = np.concatenate([read_shard(p)["image_id"] for p in sorted((tmp_path / "run" / "extract").glob("text-*"))])
    assert set(text) == set(ids) and result.manifest["counts"]["captions"] == 13
    assert result.manifest["counts"]["dropped_captions"] == 3


def test_a_caption_shard_of_the_plan_before_captions_followed_their_image_is_made_again(caption_dataset, tmp_path,
                                                                                        tiny_clip_spec):
    """A run killed before this rule existed left caption shards holding a rejected image's captions, all rows after
    them shifted; resumed, its shards are found stale by their rows (same fingerprint), made again, and the run
    ends with the shards a run from scratch makes."""
    from tqdm.auto import tqdm

    from duch.data import read_dataset
    from duch.pipeline.embed.plan import plan_shards
    from duch.pipeline.embed.shards import ShardWriter, embed_texts
    from duch.pipeline.encoders import load_encoders, parse_spec

    (caption_dataset / "images" / "fake.jpg").write_text("not an image")
    doc = json.loads((caption_dataset / "dataset.json").read_text())
    doc["images"].insert(0, {"filename": "fake.jpg", "sentences": [{"raw": "text in disguise"}, {"raw": "a fake"}]})
    (caption_dataset / "dataset.json").write_text(json.dumps(doc))
    cfg = config(caption_dataset, tmp_path / "clean", tiny_clip_spec, shard_size=4)
    clean = extract(cfg, progress=False, echo=quiet)
    expected = shard_arrays(clean.stage_dir)

    run = tmp_path / "killed"
    shutil.copytree(tmp_path / "clean", run)
    stage = run / "extract"
    (stage / "manifest.json").unlink()
    for old in stage.glob("text-*.h5"):
        old.unlink()
    old_plan = [p for p in plan_shards(read_dataset(caption_dataset), cfg, with_text=True) if p.modality == "text"]
    _, text_encoder = load_encoders(None, parse_spec(tiny_clip_spec, "text"), "cpu")
    with ShardWriter() as writer, tqdm(disable=True) as bar:  # the caption shards the earlier plan made
        embed_texts(old_plan[:3], text_encoder, cfg, clean.manifest["fingerprint"], stage, writer, bar)
        writer.wait()
    assert read_shard(stage / "text-00000.h5")["image_id"][0] == "fake"

    said = []
    result = extract(dataclasses.replace(cfg, run=str(run)), progress=False, echo=said.append)
    assert result.did_work and said[0].startswith("extract: resuming,")
    assert_same_shards(shard_arrays(stage), expected)
    assert result.manifest["counts"] == clean.manifest["counts"]


def test_image_folder_and_jsonl_forms(tmp_path, tiny_clip_spec):
    folder = tmp_path / "archive"
    (folder / "beach").mkdir(parents=True)
    shutil.copy(ASSETS / "102.jpg", folder / "beach" / "b1.jpg")
    shutil.copy(ASSETS / "1.tif", folder / "beach" / "b2.tif")
    result = extract(config(folder, tmp_path / "r1", tiny_clip_spec), progress=False, echo=quiet)
    assert result.manifest["counts"]["images"] == 2 and result.manifest["counts"]["captions"] == 0
    assert not list((tmp_path / "r1" / "extract").glob("text-*.h5"))

    pairs = tmp_path / "pairs"
    (pairs / "images").mkdir(parents=True)
    shutil.copy(ASSETS / "497.jpg", pairs / "images" / "x.jpg")
    (pairs / "rows.jsonl").write_text('{"image": "x.jpg", "caption": "houses"}\n'
                                      '{"image": "x.jpg", "caption": "roofs"}\n')
    result = extract(config(pairs, tmp_path / "r2", tiny_clip_spec, text_encoder=None, image_views=0),
                     progress=False, echo=quiet)
    shard = read_shard(tmp_path / "r2" / "extract" / "image-00000.h5")
    assert "views" not in shard and shard["emb"].shape == (1, 16)


def test_default_offline_encoders_end_to_end(caption_dataset, tmp_path):
    cfg = ExtractConfig(data=str(caption_dataset), run=str(tmp_path / "run"), image_views=1, workers=0)
    result = extract(cfg, progress=False, echo=quiet)
    assert result.manifest["encoders"] == {"image": {"encoder": "efficientnet-lite0", "dim": 1280},
                                           "text": {"encoder": "minilm-l6", "dim": 384}}
    shard = read_shard(tmp_path / "run" / "extract" / "image-00000.h5")
    assert shard["emb"].shape == (5, 1280) and shard["views"].shape == (5, 1, 1280)
    assert np.isfinite(shard["emb"].astype(np.float32)).all()


def test_cli_extract_and_one_line_errors(caption_dataset, tmp_path, tiny_clip_spec):
    runner = CliRunner()
    args = ["extract", "--data", str(caption_dataset), "--run", str(tmp_path / "run"), "--image-encoder",
            tiny_clip_spec, "--text-encoder", tiny_clip_spec, "--workers", "0", "--no-progress"]
    ok = runner.invoke(cli.main, args)
    assert ok.exit_code == 0, ok.output
    assert "extract: 5 images (+2 views each), 13 captions, 0 rejects" in ok.output
    again = runner.invoke(cli.main, args)
    assert again.exit_code == 0 and "up to date" in again.output

    bad = runner.invoke(cli.main, ["extract", "--data", str(tmp_path / "nope"), "--run", str(tmp_path / "r")])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such file or folder; "
                                               "give an annotation file or a folder of images"]
    enc = runner.invoke(cli.main, args[:5] + ["--image-encoder", "resnet9"])
    assert enc.exit_code == 2 and "unknown image encoder 'resnet9'" in enc.output
