"""Hostile files: nothing a user hands over is unpickled, and no path inside a run's data leads out of the run.

Every payload here is a pickle whose unpickling runs `touch MARKER` (os.system via __reduce__): the proof that it
was refused is that the marker never appears.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from duch import cli
from duch.pipeline.config import TrainConfig
from duch.pipeline.errors import spelled
from duch.pipeline.run.artifacts import sha256_file
from duch.stages.train_hash import train_hash

from .conftest import ASSETS

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return os.system, (self.command,)


def hostile_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    files = {"torch.save zip": folder / "model.pt", "torch.save legacy": folder / "legacy.pth",
             "bare pickle, protocol 2": folder / "weights.bin", "bare pickle, protocol 5": folder / "weights5.ckpt"}
    torch.save({"visual.proj": torch.zeros(2), "evil": Payload(marker)}, files["torch.save zip"])
    torch.save({"evil": Payload(marker)}, files["torch.save legacy"], _use_new_zipfile_serialization=False)
    files["bare pickle, protocol 2"].write_bytes(pickle.dumps(Payload(marker), protocol=2))
    files["bare pickle, protocol 5"].write_bytes(pickle.dumps(Payload(marker), protocol=5))
    return files


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(cli.main, args, prog_name="duch")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_the_payload_is_real(tmp_path):
    """The control: unpickled the ordinary way, the payload does run."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_an_open_clip_checkpoint_that_is_a_hostile_pickle_is_refused_and_never_run(tmp_path, tiny_clip_spec):
    marker = tmp_path / "pwned"
    arch = tiny_clip_spec.split(":")[1]
    (tmp_path / "data" / "images").mkdir(parents=True)
    shutil.copy(ASSETS / "102.jpg", tmp_path / "data" / "images" / "a.jpg")
    for kind, path in hostile_checkpoints(tmp_path / "ckpt", marker).items():
        line = one_line_error(["extract", "--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"),
                               "--image-encoder", f"open_clip:{arch}:{path}", "--text-encoder", "none",
                               "--workers", "0", "--device", "cpu", "--no-progress"])
        # torch's allow-list refuses the payload's call (posix.system), or the newer pickle opcodes around it
        # before it gets there.
        called = "" if "protocol 5" in kind else " (it calls for posix.system)"
        assert line == (f"error: checkpoint {path} holds pickled objects other than tensors{called}; refused: duch "
                        "loads checkpoints as tensors only and never runs code from a file. Use a checkpoint of "
                        "plain tensors (a state dict) or safetensors from a source you trust"), kind
        assert not marker.exists(), kind


def test_a_tensors_only_open_clip_checkpoint_still_loads(tmp_path, tiny_clip_spec):
    from duch.pipeline.encoders import parse_spec
    from duch.pipeline.encoders.openclip import load_open_clip

    random_weights = load_open_clip(parse_spec(tiny_clip_spec, "image"), "cpu").model.state_dict()
    torch.save(random_weights, tmp_path / "good.pt")
    arch = tiny_clip_spec.split(":")[1]
    loaded = load_open_clip(parse_spec(f"open_clip:{arch}:{tmp_path / 'good.pt'}", "image"), "cpu")
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in random_weights.items())


@pytest.fixture
def trained(tiny_extract_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_extract_run, run)
    train_hash(TrainConfig(run=str(run), bits=(8,), epochs=2, hidden=32, batch_size=8, device="cpu"),
               progress=False, echo=lambda _: None)
    return run


def resign(stage: Path, name: str) -> None:
    """List a replaced file's checksum in its manifest, as an attacker who edits both would."""
    manifest = json.loads((stage / "manifest.json").read_text())
    for out in manifest["outputs"]:
        if out["file"] == name:
            out["bytes"], out["sha256"] = (stage / name).stat().st_size, sha256_file(stage / name)
    (stage / "manifest.json").write_text(json.dumps(manifest))


def test_a_pickle_in_place_of_the_trained_model_is_refused_and_never_run(trained, tmp_path):
    marker = tmp_path / "pwned"
    model = trained / "train-hash" / "bits-8" / "model.safetensors"
    model.write_bytes(pickle.dumps(Payload(marker)))
    resign(trained / "train-hash", "bits-8/model.safetensors")
    line = one_line_error(["encode-archive", "--run", str(trained), "--device", "cpu", "--no-progress"])
    assert line.startswith(f"error: {model}: not a safetensors file of duch's (SafetensorError: ")
    assert spelled(line, "cli").endswith("); redo the train-hash stage with --force to remake it")
    assert not marker.exists()


def test_a_pickle_in_place_of_a_checkpoint_is_not_resumed_and_never_run(run_with_checkpoint):
    run, folder, marker = run_with_checkpoint
    said = []
    train_hash(TrainConfig(run=str(run), bits=(8,), epochs=4, hidden=32, batch_size=8, device="cpu",
                           checkpoint_every=2), progress=False, echo=said.append)
    assert any(s.startswith(f"train-hash: 8 bits: not resuming ({folder / 'checkpoint.json'} is unreadable "
                            "(SafetensorError") for s in said), said
    assert not marker.exists()


@pytest.fixture
def run_with_checkpoint(tiny_extract_run, tmp_path, monkeypatch):
    import duch.pipeline.train.work as th
    from duch.pipeline.formats.checkpoint import INDEX

    run = tmp_path / "run"
    shutil.copytree(tiny_extract_run, run)

    def crash(*args):
        raise KeyboardInterrupt("crash after training")
    with monkeypatch.context() as m:
        m.setattr(th, "write_history", crash)
        with pytest.raises(KeyboardInterrupt):
            train_hash(TrainConfig(run=str(run), bits=(8,), epochs=4, hidden=32, batch_size=8, device="cpu",
                                   checkpoint_every=2), progress=False, echo=lambda _: None)
    folder = run / "train-hash" / "bits-8"
    marker = tmp_path / "pwned"
    index = json.loads((folder / INDEX).read_text())
    tensors = folder / index["tensors"]["file"]
    tensors.write_bytes(pickle.dumps(Payload(marker)))
    index["tensors"].update(bytes=tensors.stat().st_size, sha256=sha256_file(tensors))
    (folder / INDEX).write_text(json.dumps(index))
    return run, folder, marker


def lead_out(stage, manifest: dict, entry: dict, key: str, evil, how: str) -> str:
    """Make the file `entry[key]` of the stage's manifest lead to `evil`, outside the stage: by a relative escape
    (`how` itself), an absolute path, or a symlink in the stage in place of the file. Returns the name the manifest
    then gives."""
    if how == "symlink":
        (stage / entry[key]).unlink()
        os.symlink(evil, stage / entry[key])
        return entry[key]
    entry[key] = str(evil) if how == "absolute" else how
    (stage / "manifest.json").write_text(json.dumps(manifest))
    return entry[key]


@pytest.mark.parametrize("stage", ["train-hash", "encode-archive"])
@pytest.mark.parametrize("how", ["../../evil.h5", "absolute", "symlink"])
def test_manifest_paths_leading_out_of_the_run_are_refused_not_followed(trained, tmp_path, stage, how):
    """An extract manifest naming a shard outside its folder (a relative escape, an absolute path, or a symlink
    inside the folder pointing out) is refused by the stage reading it, even with the right checksum."""
    extract = trained / "extract"
    evil = tmp_path / "evil.h5"
    shutil.copy(extract / "image-00000.h5", evil)  # a valid shard, out of the run
    manifest = json.loads((extract / "manifest.json").read_text())
    first = manifest["outputs"][0]
    assert first["file"] == "image-00000.h5"
    name = lead_out(extract, manifest, first, "file", evil, how)
    args = (["train-hash", "--run", str(trained), "--bits", "8", "--epochs", "1", "--hidden", "32", "--force"]
            if stage == "train-hash" else ["encode-archive", "--run", str(trained), "--device", "cpu"])
    line = one_line_error([*args, "--no-progress"])
    assert line == (f"error: {extract / 'manifest.json'} lists an output outside its stage folder ({name!r}) and "
                    "is not read; redo the extract stage with --force")


@pytest.mark.parametrize("how", ["../../evil.faiss", "absolute", "symlink"])
def test_faiss_index_names_leading_out_of_the_encode_archive_folder_are_refused_not_followed(trained, tmp_path, how):
    """search reads the faiss index files its encode-archive manifest names from that folder only."""
    from duch.pipeline.config import EncodeConfig
    from duch.stages.encode_archive import encode_archive

    encode_archive(EncodeConfig(run=str(trained), index="flat", device="cpu"), progress=False, echo=lambda _: None)
    stage = trained / "encode-archive"
    evil = tmp_path / "evil.faiss"
    shutil.copy(stage / "index-8-image.faiss", evil)  # a valid index, out of the run
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["index"]["files"]["8"]["image"] == "index-8-image.faiss"
    name = lead_out(stage, manifest, manifest["index"]["files"]["8"], "image", evil, how)
    line = one_line_error(["search", "--run", str(trained), "--bits", "8", "--text", "a harbor", "--device", "cpu"])
    assert line == (f"error: {stage / 'manifest.json'} lists an output outside its stage folder ({name!r}) and "
                    "is not read; redo the encode-archive stage with --force")


@pytest.mark.parametrize("how", ["symlinked folder", "bits a path", "bits a string of digits"])
def test_a_train_hash_manifest_cannot_lead_encode_archive_out_of_its_stage(trained, tmp_path, how):
    """The model files come from the train-hash folder only: a code length from the manifest is read as a number
    (it is part of the file's path), and a bits folder that is a symlink leading out is refused, even with the
    right checksums."""
    from duch.pipeline.run.records import TrainRun

    stage = trained / "train-hash"
    manifest = json.loads((stage / "manifest.json").read_text())
    args = ["encode-archive", "--run", str(trained), "--device", "cpu", "--no-progress"]
    if how == "symlinked folder":
        shutil.move(stage / "bits-8", tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", stage / "bits-8")
        assert one_line_error(args) == (f"error: {stage / 'manifest.json'} lists an output outside its stage folder "
                                        "('bits-8/model.safetensors') and is not read; redo the train-hash "
                                        "stage with --force")
        return
    manifest["config"]["bits"] = ["../../../evil"] if how == "bits a path" else ["8"]
    (stage / "manifest.json").write_text(json.dumps(manifest))
    if how == "bits a path":
        assert spelled(one_line_error(args), "cli") == (
            f"error: {stage / 'manifest.json'}: config.bits holds '../../../evil', not a positive whole number; redo "
            f"the train-hash stage of {trained.resolve()} with --force")
    else:
        models = TrainRun.read(trained).models
        assert list(models) == [8] and models[8].path == stage / "bits-8" / "model.safetensors"


UNSAFE = [
    (re.compile(r"\bpickle\.loads?\(|\bcPickle\b|\bdill\b|\bjoblib\.load\("), "unpickling"),
    (re.compile(r"\btorch\.load\((?![^)]*weights_only=True)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load with allow_pickle"),
    (re.compile(r"(?<![.\w])(eval|exec)\("), "eval/exec"),
    (re.compile(r"\byaml\.load\((?![^)]*SafeLoader)"), "yaml.load"),
]


def test_the_code_base_has_no_unsafe_loader():
    """Every way to run code from data, looked for in duch's own source (not its tests)."""
    found = []
    for folder in ("data", "pipeline", "stages", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                for pattern, what in UNSAFE:
                    if pattern.search(line):
                        found.append(f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    found += [f"cli.py: {what}" for pattern, what in UNSAFE if pattern.search((ROOT / "cli.py").read_text())]
    assert not found, "\n".join(found)


MANIFEST_WRITERS = {"write_text", "write_bytes", "write_json_atomic", "_write_json_atomic", "dump", "replace",
                    "rename", "copy", "copyfile", "copy2", "move"}


def manifest_writes(source: str) -> list[tuple[int, str]]:
    """(line, call) of every write in `source` that is not write_manifest's: a JSON file dumped by hand, or a call
    that writes, opens for writing, or moves into place something named like a manifest."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        text = ast.get_source_segment(source, node) or ""
        writing_open = name == "open" and any(
            isinstance(a, ast.Constant) and isinstance(a.value, str) and set(a.value) & set("wax+")
            for a in [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "mode")])
        if (name == "dump" and text.startswith("json.")) or (
                "manifest" in text.lower() and (name in MANIFEST_WRITERS or writing_open)):
            found.append((node.lineno, text.splitlines()[0]))
    return found


def test_the_manifest_write_check_sees_a_manifest_written_by_hand():
    """The control for the test below: each way of writing a manifest around write_manifest is seen."""
    bypasses = ['(out / "manifest.json").write_text(json.dumps(manifest))',
                'with open(stage / MANIFEST, "w") as f:\n    f.write(text)',
                'with open(path, "w") as f:\n    json.dump(manifest, f)',
                'write_json_atomic(out_dir / "manifest.json", manifest)',
                'os.replace(tmp, out_dir / MANIFEST)']
    for source in bypasses:
        assert manifest_writes(source), source
    assert not manifest_writes('write_manifest(out_dir, manifest)\n(out_dir / "manifest.json").unlink()\n'
                               'read_manifest(stage)\nopen(stage / MANIFEST).read()')


def test_every_manifest_is_written_by_write_manifest():
    """One writer for every stage's manifest (and the benchmarks' synthetic ones): atomic, fsynced, world-readable,
    with the integer schema number that read_manifest checks first."""
    found = []
    sources = [p for folder in ("data", "pipeline", "stages", "bench") for p in sorted((ROOT / folder).rglob("*.py"))]
    for path in [*sources, ROOT / "cli.py"]:
        if path == ROOT / "pipeline" / "run" / "manifest.py":
            continue
        found += [f"{path.relative_to(ROOT)}:{n}: {call}" for n, call in manifest_writes(path.read_text())]
    assert not found, "\n".join(found)


def test_write_manifest_always_writes_its_own_integer_schema(tmp_path):
    from duch.pipeline.run.manifest import SCHEMA_VERSION, read_manifest, write_manifest

    for given in ("1", 1.0, None, SCHEMA_VERSION + 1):  # a caller's (or a manifest read back's) schema is not kept
        write_manifest(tmp_path, {"schema": given, "stage": "test"})
        text = (tmp_path / "manifest.json").read_text()
        assert json.loads(text) == {"schema": SCHEMA_VERSION, "stage": "test"} and text.startswith('{\n "schema": 1,')
        assert read_manifest(tmp_path)["schema"] == SCHEMA_VERSION
