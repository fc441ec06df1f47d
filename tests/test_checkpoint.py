"""train-hash checkpoints: tensors in safetensors and the rest in JSON (no pickle), atomic, resumed to the same
weights, and never trusted beyond what they are (other settings, a bad checksum, a path leading out: not used).
The SIGKILL tests are in test_faults.py."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import duch.pipeline.train.work as training_work
import duch.stages.train_hash as th
from duch.pipeline.config import TrainConfig
from duch.pipeline.formats.checkpoint import (
    join_tensors,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
    split_tensors,
)
from duch.pipeline.model.heads import CodeDiscriminator, DuchHeads
from duch.pipeline.train.loop import _load_optimizer

FAST = dict(bits=(8,), epochs=6, hidden=32, batch_size=8, eval_every=2, device="cpu", checkpoint_every=2)


@pytest.fixture
def run(tiny_extract_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(tiny_extract_run, target)
    return target


def adam_state():
    heads, disc = DuchHeads(4, 4, 8, 16), CodeDiscriminator(8)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.StepLR(opt, 2, 0.8)
    heads.image(torch.randn(3, 4)).sum().backward()
    opt.step()
    schedule.step()
    return {"opt": opt.state_dict(), "schedule": schedule.state_dict(), "disc": disc.state_dict(),
            "generator": torch.Generator().manual_seed(3).get_state(), "log": [{"epoch": 1, "loss": 0.1 + 0.2}],
            "none": None, "betas": (0.5, 0.9)}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_a_state_goes_through_json_and_safetensors_unchanged():
    state = adam_state()
    tensors = {}
    tree = json.loads(json.dumps(split_tensors(state, tensors)))  # what the JSON file holds: data only
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    back = join_tensors(tree, tensors)
    assert same(state, back)  # int keys of the optimizer state stay ints, tuples stay tuples, floats exact
    assert isinstance(next(iter(back["opt"]["state"])), int)
    with pytest.raises(TypeError, match="not object"):
        split_tensors({"x": object()}, {})


def test_save_load_and_what_is_not_resumed(tmp_path):
    state = adam_state()
    save_checkpoint(tmp_path, 2, "fp", state)
    save_checkpoint(tmp_path, 4, "fp", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-e00004.safetensors", "checkpoint.json"]
    epoch, back = load_checkpoint(tmp_path, "fp")
    assert epoch == 4 and same(state, back)
    assert load_checkpoint(tmp_path, "other") == (None, "the checkpoint was made with other settings or features")

    tensors = tmp_path / "checkpoint-e00004.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 1
    tensors.write_bytes(bytes(raw))
    assert load_checkpoint(tmp_path, "fp") == (None, f"{tensors} is missing or does not match its checksum")

    # The JSON names its tensor file; a name leading out of the folder is refused, even one whose checksum
    # matches a file out there.
    outside = tmp_path.parent / "evil.safetensors"
    shutil.copy(tensors, outside)
    index = json.loads((tmp_path / "checkpoint.json").read_text())
    index["tensors"].update(file="../evil.safetensors", sha256=hashlib.sha256(outside.read_bytes()).hexdigest(),
                            bytes=outside.stat().st_size)
    (tmp_path / "checkpoint.json").write_text(json.dumps(index))
    assert load_checkpoint(tmp_path, "fp") == (None, f"{tmp_path / 'checkpoint.json'} is not a checkpoint this "
                                                     "duch writes")
    remove_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == [] and load_checkpoint(tmp_path, "fp") == (None, "no checkpoint")


def crash_after_training(monkeypatch):
    """A crash between the last epoch and the outputs (checkpoints saved, result.json not yet written)."""
    def boom(*args):
        raise KeyboardInterrupt("simulated crash")
    monkeypatch.setattr(training_work, "write_history", boom)


@pytest.mark.parametrize("options", [{}, {"w_bank": 0.1, "drop_last": True, "augment_anchor": True},
                                     {"robust_inter": True, "robust_warmup": 2, "caption_noise": 0.5}])
def test_resumed_training_ends_with_the_uninterrupted_weights(run, tmp_path, monkeypatch, options):
    cfg = dict(FAST, **options)
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    th.train_hash(TrainConfig(run=str(clean), **cfg), progress=False, echo=lambda _: None)

    with monkeypatch.context() as m:
        crash_after_training(m)
        with pytest.raises(KeyboardInterrupt):
            th.train_hash(TrainConfig(run=str(run), **cfg), progress=False, echo=lambda _: None)
    folder = run / "train-hash" / "bits-8"
    assert json.loads((folder / "checkpoint.json").read_text())["epoch"] == 4
    said = []
    th.train_hash(TrainConfig(run=str(run), **cfg), progress=False, echo=said.append)
    assert "train-hash: 8 bits: resuming from the checkpoint after epoch 4 of 6" in said
    for name in ("model.safetensors", "history.json", "losses.csv"):
        assert (folder / name).read_bytes() == (clean / "train-hash" / "bits-8" / name).read_bytes(), name
    assert not list(folder.glob("checkpoint*"))  # removed once the code length finished


def test_checkpoints_of_other_settings_or_forced_runs_are_not_resumed(run, monkeypatch):
    with monkeypatch.context() as m:
        crash_after_training(m)
        with pytest.raises(KeyboardInterrupt):
            th.train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=lambda _: None)
    said = []
    th.train_hash(TrainConfig(run=str(run), **(FAST | {"tau": 0.5})), progress=False, echo=said.append)
    assert "train-hash: 8 bits: not resuming (the checkpoint was made with other settings or features); training " \
           "from the start" in said

    with monkeypatch.context() as m:
        crash_after_training(m)
        with pytest.raises(KeyboardInterrupt):
            th.train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=lambda _: None, force=True)
    said = []
    th.train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=said.append, force=True)
    assert not any("resuming" in s for s in said)  # --force starts over


def test_checkpoint_every_is_no_output_setting(run):
    th.train_hash(TrainConfig(run=str(run), **(FAST | {"checkpoint_every": 0})), progress=False, echo=lambda _: None)
    assert not list((run / "train-hash" / "bits-8").glob("checkpoint*"))
    said = []
    result = th.train_hash(TrainConfig(run=str(run), **(FAST | {"checkpoint_every": 5})), progress=False,
                           echo=said.append)
    assert not result.did_work and "up to date" in said[0]
    with pytest.raises(Exception, match="`checkpoint_every` must be 0"):
        TrainConfig(run=str(run), checkpoint_every=-1).validate()


def test_model_file_bytes_do_not_depend_on_the_run(run, tmp_path):
    """The same weights make the same file: its SHA-256 stands for the model in encode-archive and search."""
    other = tmp_path / "other"
    shutil.copytree(run, other)
    for r in (run, other):
        th.train_hash(TrainConfig(run=str(r), **(FAST | {"epochs": 2})), progress=False, echo=lambda _: None)
    a, b = (r / "train-hash" / "bits-8" / "model.safetensors" for r in (run, other))
    assert a.read_bytes() == b.read_bytes()
    assert load_file(a).keys() == load_file(b).keys()


def test_an_optimizer_with_a_device_tensor_lr_keeps_that_tensor_through_a_restore():
    """The CUDA-graph path's Adam reads its lr from a tensor that a captured graph holds by address; a restore
    must write the saved value into that tensor, not swap in another (checked here on the CPU, the same code)."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2), foreach=False)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)

    def step(model, opt, schedule):
        opt.zero_grad()
        model(torch.ones(3, 4)).square().sum().backward()
        opt.step()
        schedule.step()

    model, opt, schedule = make()
    for _ in range(2):
        step(model, opt, schedule)
    tensors = {}
    saved = join_tensors(split_tensors({"model": model.state_dict(), "opt": opt.state_dict(),
                                        "schedule": schedule.state_dict()}, tensors), tensors)
    at_save = opt.param_groups[0]["lr"].clone()
    step(model, opt, schedule)

    other, other_opt, other_schedule = make()
    lr = other_opt.param_groups[0]["lr"]
    other.load_state_dict(saved["model"])
    _load_optimizer(other_opt, saved["opt"])
    other_schedule.load_state_dict(saved["schedule"])
    assert other_opt.param_groups[0]["lr"] is lr and torch.equal(lr, at_save)
    step(other, other_opt, other_schedule)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert other_opt.param_groups[0]["lr"] is lr and torch.equal(lr, opt.param_groups[0]["lr"])
