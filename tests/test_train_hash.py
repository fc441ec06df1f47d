import csv
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from duch import cli
from duch.pipeline import DuchError
from duch.pipeline.config import TRAIN_RECIPES, TrainConfig, parse_overrides
from duch.pipeline.formats.features import load_features
from duch.pipeline.formats.weights import load_heads
from duch.pipeline.model.coding import image_codes, pack_codes, unpack_codes
from duch.pipeline.model.heads import CodeDiscriminator, DuchHeads
from duch.pipeline.model.losses import nt_xent
from duch.pipeline.retrieval.hamming import hamming
from duch.pipeline.retrieval.metrics import query_adaptive_ranking, ranking, weighted_distances
from duch.pipeline.train.data import prepare, sample_views
from duch.pipeline.train.graphs import graph_chunks
from duch.pipeline.train.loop import epoch_batches, epoch_row, make_optimizers
from duch.pipeline.train.step import (
    LOSS_TERMS,
    StepState,
    binary_targets,
    fused_paper_terms,
    fused_terms,
    paper_terms,
    train_step,
    with_nested_terms,
)
from duch.pipeline.train.validate import hamming_rankings
from duch.stages.train_hash import train_hash

FAST = dict(bits=(8, 16), epochs=3, hidden=32, batch_size=8, eval_every=2, device="cpu")


def quiet(_):
    pass


@pytest.fixture
def run(tiny_extract_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(tiny_extract_run, target)
    return target


def test_outputs_table_and_rerun(run):
    said = []
    result = train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=said.append)
    stage = run / "train-hash"
    assert result.did_work
    for bits in (8, 16):
        folder = stage / f"bits-{bits}"
        tensors = load_file(folder / "model.safetensors")
        assert tensors["image_head.net.3.weight"].shape == (bits, 32)
        assert "discriminator.net.0.weight" in tensors
        heads = load_heads(folder / "model.safetensors", image_dim=16, text_dim=16, bits=bits, hidden=32)
        assert torch.equal(heads.text.net[3].weight, tensors["text_head.net.3.weight"]) and not heads.training
        rows = list(csv.DictReader(open(folder / "losses.csv")))
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
        assert {"inter", "image", "text", "adversarial", "quantization", "balance", "discriminator"} <= rows[0].keys()
        history = json.loads((folder / "history.json").read_text())
        assert [e["epoch"] for e in history["validation"]] == [2, 3]
        assert (folder / "losses.png").read_bytes()[:4] == b"\x89PNG"
    split = json.loads((stage / "split.json").read_text())
    assert (len(split["train"]), len(split["query"]), len(split["database"])) == (12, 2, 10)
    assert not set(split["train"]) & set(split["query"] + split["database"])
    manifest = json.loads((stage / "manifest.json").read_text())
    value = manifest["results"]["16"]["map"]["I->T"]
    assert set(value) == {"reference", "textbook"} and 0 <= value["reference"] <= 1
    assert any(line.startswith("mAP@20 (reference)") for line in said)
    again = []
    assert not train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=again.append).did_work
    assert "up to date" in again[0]


def test_options_added_later_enter_the_fingerprint_only_when_on(run):
    """A run trained before an option existed stays up to date while the option is off; turning it on retrains."""
    off = dict(w_inter_all=0.0, w_inter_binary=0.0, caption_noise=0.0, robust_inter=False, robust_warmup=3,
               view_ensemble=False)
    train_hash(TrainConfig(run=str(run), **FAST, **off), progress=False, echo=quiet)
    manifest_file = run / "train-hash" / "manifest.json"
    settings = json.loads(manifest_file.read_text())["basis"]["settings"]
    assert not set(TrainConfig.LATER_OPTIONS) & set(settings)  # what a run made before them holds
    assert not train_hash(TrainConfig(run=str(run), **FAST, **{**off, "robust_warmup": 7}), progress=False,
                          echo=quiet).did_work
    on = train_hash(TrainConfig(run=str(run), **FAST, **{**off, "w_inter_all": 1.0}), progress=False, echo=quiet)
    assert on.did_work and on.manifest["basis"]["settings"]["w_inter_all"] == 1.0
    # view_ensemble is on by default: a default run is not one made before it (its validation mAPs differ).
    default = train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=quiet)
    assert default.did_work and default.manifest["basis"]["settings"]["view_ensemble"] is True


def outputs(manifest: dict) -> list[dict]:
    """A train-hash manifest's outputs less the result files (they hold the training time)."""
    return [o for o in manifest["outputs"] if not o["file"].endswith("result.json")]


def test_a_rerun_of_a_finished_run_trains_again_the_code_lengths_whose_files_are_gone_or_altered(run):
    """What later stages tell a user to do when a model file is missing or altered: the same command again."""
    train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=quiet)
    stage = run / "train-hash"
    manifest = json.loads((stage / "manifest.json").read_text())
    model = stage / "bits-16" / "model.safetensors"
    original = model.read_bytes()
    model.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped, the size unchanged
    said = []
    result = train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=said.append)
    assert result.did_work and said[:2] == [
        f"train-hash: {model} is missing, unlisted or does not match its checksum; training 16 bits again",
        "train-hash: 8 bits already trained, kept"]
    assert model.read_bytes() == original
    assert outputs(result.manifest) == outputs(manifest)
    (stage / "bits-8" / "history.json").unlink()  # no manifest to compare with: a crash before it was written
    (stage / "manifest.json").unlink()
    said = []
    assert train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=said.append).did_work
    assert "train-hash: 8 bits already trained, kept" not in said
    assert "train-hash: 16 bits already trained, kept" in said
    assert outputs(json.loads((stage / "manifest.json").read_text())) == outputs(manifest)


def test_same_command_gives_bit_identical_weights(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    for r in (run, other):
        train_hash(TrainConfig(run=str(r), **FAST), progress=False, echo=quiet)
    for bits in (8, 16):
        a = load_file(run / "train-hash" / f"bits-{bits}" / "model.safetensors")
        b = load_file(other / "train-hash" / f"bits-{bits}" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    seeded = train_hash(TrainConfig(run=str(other), **(FAST | {"seed": 1})), progress=False, echo=quiet)
    c = load_file(seeded.stage_dir / "bits-8" / "model.safetensors")
    a = load_file(run / "train-hash" / "bits-8" / "model.safetensors")
    assert not torch.equal(a["image_head.net.0.weight"], c["image_head.net.0.weight"])


def test_views_are_distinct_captions_unless_reference_quirks(run):
    data = prepare(load_features(run), torch.device("cpu"))
    items = torch.arange(24)
    _, xa, t1, t2 = sample_views(data, items, torch.Generator().manual_seed(0), quirks=False)
    assert not torch.equal(t1, t2) and (t1 != t2).any(dim=1).all()  # every item: two different captions
    assert not torch.equal(xa, data.image)
    _, _, q1, q2 = sample_views(data, items, torch.Generator().manual_seed(0), quirks=True)
    assert torch.equal(q1, q2)
    # augment_anchor: two distinct embeddings of {original, view 1, view 2} for every item.
    x, xa, _, _ = sample_views(data, items, torch.Generator().manual_seed(0), quirks=False, augment_anchor=True)
    candidates = torch.cat([data.image[:, None], data.views], dim=1)  # [24, 3, D]
    for picked in (x, xa):
        assert ((candidates == picked[:, None]).all(dim=2).any(dim=1)).all()
    assert (x != xa).any(dim=1).all()
    assert (x != data.image).any()  # the anchor is not always the original


@pytest.mark.parametrize("change, message", [
    (dict(bits=(12,)), "`bits` 12: code lengths must be positive multiples of 8"),
    (dict(split="dataset"), None),
    (dict(precision="fp8"), "`precision` must be auto, bf16 or fp32"),
    (dict(caption_noise=1.5), "caption_noise is the share of training items given wrong captions, from 0 to 1"),
])
def test_config_errors(run, change, message):
    if message is None:  # the dataset's own split works: train+val to train, test to query and database
        result = train_hash(TrainConfig(run=str(run), **(FAST | change)), progress=False, echo=quiet)
        assert result.manifest["split"] == {"mode": "dataset", "train": 16, "query": 8, "database": 8}
        return
    with pytest.raises(DuchError, match=message):
        train_hash(TrainConfig(run=str(run), **(FAST | change)), progress=False, echo=quiet)


def resign(run):
    """After a deliberate edit of a shard: its manifest lists the new checksum, as if extract had written it so
    (otherwise the checksum check refuses the shard before the check under test runs)."""
    from duch.pipeline.run.artifacts import sha256_file
    from duch.pipeline.run.manifest import write_manifest

    stage = run / "extract"
    manifest = json.loads((stage / "manifest.json").read_text())
    for out in manifest["outputs"]:
        out["bytes"], out["sha256"] = (stage / out["file"]).stat().st_size, sha256_file(stage / out["file"])
    manifest.pop("schema")
    write_manifest(stage, manifest)


def test_nan_features_and_missing_extract_are_refused(run, tmp_path):
    with h5py.File(run / "extract" / "image-00001.h5", "r+") as f:
        emb = f["emb"][()]
        emb[3, 0] = np.nan
        f["emb"][...] = emb
    resign(run)
    with pytest.raises(DuchError, match=r"image embeddings hold NaN or Inf \(1 rows, e.g. items 13\)"):
        train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=quiet)
    assert not (run / "train-hash").exists()  # refused before any training
    with pytest.raises(DuchError, match="no finished extract stage"):
        train_hash(TrainConfig(run=str(tmp_path / "empty"), **FAST), progress=False, echo=quiet)


def test_cli_train_hash(run):
    result = CliRunner().invoke(cli.main, ["train-hash", "--run", str(run), "--bits", "8", "--epochs", "2",
                                           "--hidden", "32", "--batch-size", "8", "--device", "cpu",
                                           "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "train-hash: 8 bits in" in result.output and "mAP@20 (reference)" in result.output
    bad = CliRunner().invoke(cli.main, ["train-hash", "--run", str(run), "--bits", "8,20"])
    assert bad.exit_code == 2 and bad.output.strip() == \
        "error: --bits 20: code lengths must be positive multiples of 8 (e.g. 16,32,64,128)"


def test_shards_of_different_dimensions_are_refused(run):
    path = run / "extract" / "image-00001.h5"
    with h5py.File(path, "r+") as f:
        emb = f["emb"][()]
        del f["emb"]
        f["emb"] = np.zeros((len(emb), emb.shape[1] + 1), emb.dtype)
    resign(run)
    with pytest.raises(DuchError, match=r"image-00001.h5: embeddings of shape \(17, 2, 16\) do not match"):
        train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=quiet)


@pytest.mark.parametrize("option", [
    dict(w_inter_second=1.0), dict(w_inter_views=1.0), dict(w_inter_all=1.0), dict(w_inter_binary=1.0),
    dict(w_bank=0.5), dict(drop_last=True, batch_size=5),
    dict(augment_anchor=True), dict(reference_quirks=True), dict(precision="fp32"),
    dict(robust_inter=True, robust_warmup=1, caption_noise=0.5),
])
def test_training_options_run_and_report_their_terms(run, option):
    result = train_hash(TrainConfig(run=str(run), **(FAST | dict(bits=(8,), epochs=2) | option)), progress=False,
                        echo=quiet)
    losses = result.manifest["results"]["8"]["final_losses"]
    extra_on = any(option.get(k) for k in ("w_inter_second", "w_inter_views", "w_inter_all", "w_inter_binary",
                                           "w_bank"))
    assert (losses["inter_extra"] > 0) == bool(extra_on)
    assert all(np.isfinite(v) for v in losses.values())


def test_caption_noise_trains_on_swapped_captions_and_evaluates_on_the_true_ones(run, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    config = FAST | dict(bits=(8,), epochs=2)
    said = []
    noisy = train_hash(TrainConfig(run=str(run), caption_noise=0.5, **config), progress=False, echo=said.append)
    train_hash(TrainConfig(run=str(clean), **config), progress=False, echo=quiet)
    assert noisy.manifest["split"]["captions_swapped"] == 6  # half of the 12 training items
    assert "train-hash: caption_noise 0.5: 6 of 12 training items train with another item's captions" in said
    split, clean_split = (json.loads((r / "train-hash" / "split.json").read_text()) for r in (run, clean))
    pairs = split.pop("captions_swapped")
    assert len(pairs) == 6 and all(a != b and a in split["train"] and b in split["train"] for a, b in pairs)
    assert split == clean_split  # the split and every evaluation caption as without noise
    weights = [load_file(r / "train-hash" / "bits-8" / "model.safetensors")["text_head.net.0.weight"]
               for r in (run, clean)]
    assert not torch.equal(*weights)


def test_epoch_batches_skip_only_a_last_batch_too_small():
    assert epoch_batches(10, 4, drop_last=False) == [(0, 4), (4, 8), (8, 10)]
    assert epoch_batches(9, 4, drop_last=False) == [(0, 4), (4, 8)]  # BatchNorm cannot take 1 item
    assert epoch_batches(10, 4, drop_last=True) == [(0, 4), (4, 8)]
    assert epoch_batches(3, 4, drop_last=True) == []


def test_graph_chunks_group_consecutive_batches_of_one_size():
    batches = epoch_batches(1050, 256, drop_last=False)  # 4 full, 1 of 26
    assert graph_chunks(batches) == [batches[:4], batches[4:]]
    batches = epoch_batches(10 * 4 + 3, 4, drop_last=False)  # 10 full, 1 of 3
    assert graph_chunks(batches, most=4) == [batches[0:4], batches[4:8], batches[8:10], batches[10:]]
    assert graph_chunks([]) == []


def test_one_draw_per_epoch_gives_the_numbers_of_one_draw_per_step():
    # The epoch loop draws every batch's interpolation weights at once; the CPU results stay bit-identical only
    # because the generator gives the same stream either way.
    per_epoch = torch.rand(1050, 1, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    per_step = torch.cat([torch.rand(b - a, 1, generator=gen) for a, b in epoch_batches(1050, 256, False)])
    assert torch.equal(per_epoch, per_step)


def test_loss_sums_on_the_device_give_the_history_of_python_float_sums():
    values = torch.randn(7, len(LOSS_TERMS), generator=torch.Generator().manual_seed(0)) * 3  # float32, as losses
    python = dict.fromkeys(LOSS_TERMS, 0.0)
    device = torch.zeros(len(LOSS_TERMS), dtype=torch.float64)
    for step in values:
        for key, value in zip(LOSS_TERMS, step):
            python[key] += float(value)
        device += step.double()
    assert epoch_row(4, device, 7) == {"epoch": 4, **{k: v / 7 for k, v in python.items()}}  # to the bit


def test_graph_optimizers_keep_their_learning_rate_tensor_through_steplr():
    # A CUDA graph reads the learning rate from one device tensor: StepLR must change it in place.
    heads, disc = DuchHeads(4, 4, 8, 8), CodeDiscriminator(8)
    cfg = TrainConfig(run="unused", lr=1e-3, disc_lr=2e-3, lr_step=2, lr_decay=0.5)
    opt, disc_opt = make_optimizers(heads, disc, cfg, torch.device("cpu"), graphs=True)
    tensors = [o.param_groups[0]["lr"] for o in (opt, disc_opt)]
    schedules = [torch.optim.lr_scheduler.StepLR(o, cfg.lr_step, cfg.lr_decay) for o in (opt, disc_opt)]
    for _ in range(5):
        for o, schedule in zip((opt, disc_opt), schedules):
            o.step()
            schedule.step()
    assert [o.param_groups[0]["lr"] for o in (opt, disc_opt)] == tensors  # the same objects
    assert [float(t) for t in tensors] == pytest.approx([1e-3 / 4, 2e-3 / 4])


def random_codes(n=6, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = tuple(torch.tanh(torch.randn(n, k, generator=gen)).requires_grad_(True) for _ in range(4))
    return codes, torch.where(torch.randn(n, k, generator=gen) >= 0, 1.0, -1.0)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_fused_terms_equal_the_paper_terms_and_their_gradients(tau):
    codes, b = random_codes()
    adversarial = lambda: codes[0].sum() * 0.1  # noqa: E731
    reference = paper_terms(codes, b, tau, adversarial)
    fused = fused_terms(fused_paper_terms)(codes, b, tau, adversarial)
    assert reference.keys() == fused.keys()
    gradients = lambda loss: [torch.zeros_like(c) if g is None else g  # noqa: E731
                              for c, g in zip(codes, torch.autograd.grad(loss, codes, allow_unused=True,
                                                                         retain_graph=True))]
    for key in reference:
        assert float(fused[key].detach()) == pytest.approx(float(reference[key].detach()), rel=1e-6), key
        for e, g in zip(gradients(reference[key]), gradients(fused[key])):
            assert torch.allclose(e, g, atol=1e-6), key


def step_state(data, bits=8, hidden=16):
    torch.manual_seed(0)
    heads, disc = DuchHeads(data.image.shape[1], data.text.shape[1], bits, hidden), CodeDiscriminator(bits)
    cfg = TrainConfig(run="unused", bits=(bits,), hidden=hidden, precision="fp32")
    opt, disc_opt = make_optimizers(heads, disc, cfg, torch.device("cpu"), graphs=False)
    views = sample_views(data, torch.arange(len(data.image)), torch.Generator().manual_seed(1), quirks=False)
    targets = binary_targets(heads, views)
    return cfg, StepState(heads, disc, opt, disc_opt, list(views), targets, torch.zeros_like(targets), None,
                          torch.zeros(len(LOSS_TERMS), dtype=torch.float64))


def test_a_step_with_the_fused_terms_trains_as_the_reference_step(run):
    # The GPU's step (fused terms) on the CPU, without the CUDA graph: the same losses and updates up to rounding.
    data = prepare(load_features(run), torch.device("cpu"))
    (cfg, reference), (_, fused) = step_state(data), step_state(data)
    eps = torch.rand(8, 1, generator=torch.Generator().manual_seed(2))
    for idx in (torch.arange(8), torch.arange(8, 16)):
        train_step(reference, cfg, idx, eps)
        train_step(fused, cfg, idx, eps, terms_of=fused_terms(fused_paper_terms))
    assert torch.allclose(fused.sums, reference.sums, rtol=1e-5)
    for a, b in zip(fused.heads.parameters(), reference.heads.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(fused.code_sums != 0, reference.code_sums != 0)


def test_binary_targets_in_chunks_equal_one_pass(run):
    data = prepare(load_features(run), torch.device("cpu"))
    _, state = step_state(data)
    assert torch.equal(binary_targets(state.heads, state.views, chunk=5), state.targets)


def test_hamming_ranking_ranks_as_packed_codes_do():
    gen = torch.Generator().manual_seed(0)
    query, database = torch.randn(9, 16, generator=gen), torch.randn(40, 16, generator=gen)
    database[5:20] = database[0]  # ties, kept in database order
    database[3, :4] = 0.0  # 0 counts as bit 1, as in pack_codes
    expected = ranking(-hamming(pack_codes(query), pack_codes(database)).astype(np.float64))
    assert np.array_equal(hamming_rankings(query, database)[0], expected)


def test_adaptive_hamming_ranking_orders_ties_as_evaluate_does():
    """train-hash validation's query-adaptive ranking (torch, on the codes' device) equals evaluate's (numpy, from
    the packed codes and the float16 queries encode-archive stores)."""
    gen = torch.Generator().manual_seed(1)
    query, database = torch.tanh(torch.randn(9, 16, generator=gen)), torch.randn(60, 16, generator=gen)
    database[5:20] = database[0]  # identical codes: still in database order
    d = hamming(pack_codes(query), pack_codes(database)).astype(np.int32)
    stored = query.half().numpy()
    expected = query_adaptive_ranking(d, weighted_distances(stored, unpack_codes(pack_codes(database), 16)))
    plain, got = hamming_rankings(query, database)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, plain)  # the ties were reordered
    # Still nearest first by Hamming distance.
    assert (np.diff(np.take_along_axis(d, got, axis=1), axis=1) >= 0).all()


def test_image_codes_average_the_head_over_the_image_and_its_views():
    head = torch.nn.Tanh()
    image = torch.tensor([[0.5, -2.0, 0.2]])
    views = torch.tensor([[[1.0, 0.0, -1.0], [-1.0, 1.0, -1.0]]])  # [n=1, V=2, D=3]
    got = image_codes(head, image, views)
    # (tanh 0.5 + tanh 1 + tanh -1) / 3, (tanh -2 + 0 + tanh 1) / 3, (tanh 0.2 + 2 tanh -1) / 3
    assert torch.allclose(got, torch.tensor([[0.154039, -0.067478, -0.441938]]), atol=1e-6)
    assert torch.equal(image_codes(head, image, None), torch.tanh(image))  # the image alone: its sign is 1
    assert torch.equal(image_codes(head, image, views[:, :0]), torch.tanh(image))
    bn = torch.nn.BatchNorm1d(3).train()
    image_codes(bn, torch.randn(4, 3), torch.randn(4, 2, 3))
    assert bn.training and int(bn.num_batches_tracked) == 0  # coded in eval mode, handed back as it was


def test_recipes_the_defaults_and_the_papers_settings():
    # The paper's values (docs/design.md, 2.6), field by field: the paper recipe must give every one of them.
    paper = dict(batch_size=256, epochs=100, hidden=4096, tau=1.0, w_inter=1.0, w_image=1.0, w_text=1.0, alpha=0.01,
                 beta=0.001, gamma=0.01, gp_weight=10.0, lr=1e-4, weight_decay=5e-4, disc_lr=1e-4,
                 disc_betas=(0.5, 0.9), disc_weight_decay=1e-4, lr_step=50, lr_decay=0.8)
    cfg = TrainConfig.recipe("paper", run="r")
    assert {k: getattr(cfg, k) for k in paper} == paper
    default = TrainConfig(run="r")
    assert TrainConfig.recipe("duch", run="r") == default
    assert {k for k in paper if getattr(default, k) != paper[k]} == {"batch_size", "epochs", "lr_step", "beta"}
    # The quantization weight: the paper's at every code length; the default's grows with it from 0.01 at 64 bits.
    assert [cfg.quantization_weight(k) for k in (16, 64, 128)] == [0.001] * 3
    assert [default.quantization_weight(k) for k in (16, 32, 64, 128)] == [0.0025, 0.005, 0.01, 0.02]
    assert default.view_ensemble and not cfg.view_ensemble  # the paper codes an image from the image alone
    assert TrainConfig.recipe("paper", run="r", epochs=3).epochs == 3  # given fields win over the recipe's
    with pytest.raises(DuchError, match="`recipe` 'fast': unknown; use one of duch, paper"):
        TrainConfig.recipe("fast", run="r")


def test_cli_recipe_and_its_help_give_the_configs_values(run):
    help_text = " ".join(CliRunner().invoke(cli.main, ["train-hash", "--help"]).output.split())
    # cli.py names the recipes and their values itself (importing the config at start-up costs seconds).
    assert f"--recipe [{'|'.join(TRAIN_RECIPES)}]" in help_text
    paper = TrainConfig.recipe("paper", run="r")
    default = TrainConfig(run="r")
    assert f"the recipe's: {default.epochs}, paper {paper.epochs}" in help_text
    assert f"the recipe's: {default.batch_size}, paper {paper.batch_size}" in help_text
    assert (f"batch {paper.batch_size}, {paper.epochs} epochs, lr decay at {paper.lr_step}, quantization "
            f"{paper.beta}") in help_text
    result = CliRunner().invoke(cli.main, ["train-hash", "--run", str(run), "--bits", "8", "--recipe", "paper",
                                           "--epochs", "2", "--batch-size", "8", "--hidden", "32", "--device", "cpu",
                                           "--no-progress"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "train-hash" / "config.json").read_text())
    assert (config["epochs"], config["batch_size"], config["lr_step"], config["beta"]) == (2, 8, 50, 0.001)


def test_set_overrides_become_typed_fields_or_one_error_each():
    assert parse_overrides(["w_inter_all=2", "beta=0.005", "disc_betas=0.4,0.8", "drop_last=True", "bits=16",
                            "precision=fp32"], TrainConfig) == dict(
        w_inter_all=2.0, beta=0.005, disc_betas=(0.4, 0.8), drop_last=True, bits=(16,), precision="fp32")
    assert parse_overrides(["robust_inter=true", "drop_last=off"], TrainConfig) == dict(robust_inter=True,
                                                                                       drop_last=False)
    with pytest.raises(DuchError, match=r"^`overrides` drop_last=maybe: takes a bool \(like False\), not 'maybe'$"):
        parse_overrides(["drop_last=maybe"], TrainConfig)
    with pytest.raises(DuchError, match=r"^`overrides` beta=abc: takes a float \(like 0.01\), not 'abc'$"):
        parse_overrides(["beta=abc"], TrainConfig)
    with pytest.raises(DuchError, match=r"^`overrides` lr_step=2.5: takes an int \(like 25\), not 2.5$"):
        parse_overrides(["lr_step=2.5"], TrainConfig)
    with pytest.raises(DuchError, match=r"^`overrides` epochs=3: use `epochs` instead$"):
        parse_overrides(["epochs=3"], TrainConfig, reserved=("epochs",))
    for unknown in ("no_such=1", "beta", "device=cpu"):  # not a field, no value, a runtime field with its own option
        with pytest.raises(DuchError, match=rf"^`overrides` {unknown}: TrainConfig has no such setting; give KEY=VALUE "
                                            "with KEY one of alpha, "):
            parse_overrides([unknown], TrainConfig)


def test_cli_set_reaches_the_config_over_the_recipe(run):
    result = CliRunner().invoke(cli.main, ["train-hash", "--run", str(run), "--bits", "8", "--recipe", "paper",
                                           "--epochs", "2", "--batch-size", "8", "--hidden", "32", "--device", "cpu",
                                           "--set", "w_inter_all=1", "--set", "lr_step=7", "--no-progress"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "train-hash" / "config.json").read_text())
    assert (config["w_inter_all"], config["lr_step"], config["beta"]) == (1.0, 7, 0.001)
    bad = CliRunner().invoke(cli.main, ["train-hash", "--run", str(run), "--set", "tau=2"])
    assert bad.exit_code == 2 and bad.output.strip() == "error: --set tau=2: use --tau instead"


def test_nested_terms_add_the_prefix_contrastive_terms():
    torch.manual_seed(0)
    codes = tuple(torch.tanh(torch.randn(6, 8)) for _ in range(4))
    b = torch.sign(torch.randn(6, 8))
    adversarial = lambda: torch.tensor(0.25)  # noqa: E731
    plain = paper_terms(codes, b, 0.5, adversarial)
    nested = with_nested_terms(plain, codes, 4, 0.5, 2.0)
    hi, hia, ht, hta = (h[:, :4] for h in codes)
    assert nested["inter"] == pytest.approx(float(plain["inter"] + 2 * nt_xent(hi, ht, 0.5)))
    assert nested["image"] == pytest.approx(float(plain["image"] + 2 * nt_xent(hi, hia, 0.5)))
    assert nested["text"] == pytest.approx(float(plain["text"] + 2 * nt_xent(ht, hta, 0.5)))
    for key in ("adversarial", "quantization", "balance"):
        assert nested[key] == plain[key]
