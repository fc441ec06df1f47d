"""Stage configs as dataclasses, and the fingerprint that says whether two runs would write the same outputs."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from data.augment import ImageAugment, TextAugment
from pipeline.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER


@dataclass
class ExtractConfig:
    data: str  # annotation file (.json/.jsonl/.csv) or folder
    run: str  # run directory; the stage writes into RUN/extract
    images: str | None = None  # images folder, when not beside the annotation
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    text_encoder: str | None = DEFAULT_TEXT_ENCODER  # None: images only
    image_views: int = 2  # augmented views per image, for DUCH's intra-modal term
    seed: int = 0
    shard_size: int = 4096  # items (images, or captions) per shard
    dtype: str = "float16"
    image_augment: ImageAugment = field(default_factory=ImageAugment)
    text_augment: TextAugment = field(default_factory=TextAugment)
    # How the work runs; these never change what is written.
    device: str = "auto"
    batch_size: int = 64
    text_batch_size: int = 512
    workers: int | None = None  # DataLoader worker processes; None: one per spare core, at most 8
    # Image decoding: "gpu" JPEGs in batches with nvJPEG, resized in batches on the GPU; "cpu" PIL, image by
    # image, in worker processes; "auto" gpu on a CUDA device when the archive is mostly JPEG and there are no
    # augmented views. Both give the same embeddings within float16 rounding, so it is no output setting.
    decode: str = "auto"
    # Where the shards are made: "none" (this process), "local[:N]" (a dask LocalCluster of N worker processes)
    # or the address of a running dask scheduler, tcp://host:8786. Shards are equal either way.
    scheduler: str = "none"
    # Torch threads per encoding process; None: torch's default in-process, the cores shared out on a local
    # cluster. CPU float32 matmuls may sum in another order with another thread count (a last-bit difference
    # in a few values), so runs compared bit for bit use the same count.
    threads: int | None = None

    RUNTIME_FIELDS = ("device", "batch_size", "text_batch_size", "workers", "decode", "run", "scheduler", "threads")

    def __post_init__(self):
        # The augmentations as a manifest records them (dicts, lists for tuples): ExtractConfig(**manifest["config"])
        # rebuilds the run's config.
        if isinstance(self.image_augment, dict):
            self.image_augment = ImageAugment.from_record(self.image_augment)
        if isinstance(self.text_augment, dict):
            self.text_augment = TextAugment(**self.text_augment)

    def validate(self) -> None:
        from pipeline import DuchError

        if self.image_views < 0:
            raise DuchError(f"--image-views must be 0 or more, got {self.image_views}")
        if self.shard_size < 1:
            raise DuchError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.batch_size < 1 or self.text_batch_size < 1:
            raise DuchError("batch sizes must be at least 1")
        if self.dtype not in ("float16", "float32"):
            raise DuchError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise DuchError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.decode not in ("auto", "gpu", "cpu"):
            raise DuchError(f"--decode must be auto, gpu or cpu, got {self.decode!r}")
        _check_scheduler(self.scheduler)
        if self.threads is not None and self.threads < 1:
            raise DuchError(f"--threads must be at least 1, got {self.threads}")

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return max(0, self.workers)
        return min(8, max(1, (os.cpu_count() or 1) - 1))

    def output_settings(self) -> dict:
        # Where the data lives is an input, fingerprinted by content, not by path.
        return output_settings(self, ("data", "images"))


def output_settings(cfg, also_drop: tuple[str, ...] = ()) -> dict:
    """The fields that decide the bytes a stage writes: the basis of its fingerprint."""
    out = dataclasses.asdict(cfg)
    for name in (*cfg.RUNTIME_FIELDS, *also_drop):
        out.pop(name, None)
    return out


def parse_overrides(items, cls, reserved: tuple[str, ...] = ()) -> dict:
    """`KEY=VALUE` strings (`--set`) as fields of the dataclass `cls`: each value a Python literal of its field's
    type (an int where a float is wanted, a comma list or one number for a tuple). `reserved`: fields that have
    options of their own, named in the error instead."""
    from pipeline import DuchError

    fields = {f.name: f for f in dataclasses.fields(cls)}
    runtime = getattr(cls, "RUNTIME_FIELDS", ())
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if key in reserved:
            raise DuchError(f"--set {item}: use --{key.replace('_', '-')} instead")
        if not sep or key not in fields or key in runtime:
            names = sorted(set(fields) - set(runtime) - set(reserved))
            raise DuchError(f"--set {item}: {cls.__name__} has no such setting; give KEY=VALUE with KEY one of "
                            f"{', '.join(names)}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        out[key] = _as_field_type(item, value, _field_default(fields[key]))
    return out


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _as_field_type(item: str, value, default):
    from pipeline import DuchError

    kind = type(default)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    if default is None or (kind is float and type(value) in (int, float)) or (kind is type(value)):
        return float(value) if kind is float else value
    if kind is tuple and isinstance(value, (list, int, float)):
        return tuple(value) if isinstance(value, list) else (value,)
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise DuchError(f"--set {item}: takes {article} {kind.__name__} (like {default!r}), not {value!r}")


def manifest_config(cfg) -> dict:
    """The config a manifest records: all of it but where the work ran (recorded apart, under "execution"), so a
    run on a cluster and one in-process leave the same manifest but for timings."""
    out = dataclasses.asdict(cfg)
    out.pop("scheduler", None)
    return out


def _check_scheduler(text: str) -> None:
    from pipeline.cluster import SchedulerSpec

    SchedulerSpec.parse(text)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# DUCH's published training settings (DESIGN.md section 1) where TrainConfig's defaults depart from them; the
# defaults are what measured best on UCM-captions (bench/train_quality.py, mean of 3 seeds; README, "Quality").
PAPER_TRAINING = {"batch_size": 256, "epochs": 100, "lr_step": 50, "beta": 0.001, "beta_scales_with_bits": False,
                  "view_ensemble": False}
# Named settings, as open_clip names model configs: "duch" is the defaults, "paper" the published values.
TRAIN_RECIPES = {"duch": {}, "paper": PAPER_TRAINING}


@dataclass
class TrainConfig:
    """Stage 2. Every weight and hyper-parameter of DESIGN.md section 1 is a field; the defaults are the paper's
    except those in PAPER_TRAINING, which measured better as they are here (`recipe("paper")` restores them)."""

    run: str  # run directory holding a finished extract stage; writes RUN/train-hash
    bits: tuple[int, ...] = (16, 32, 64, 128)
    split: str = "paper"  # "paper" (seed 42: 50% train, 20%/80% of the rest query/database), "dataset", "all"
    split_seed: int = 42
    seed: int = 0
    # Paper: batch 256 for 100 epochs. Half the batch for half the epochs (450 steps to 500 on UCM, 20% less time)
    # gave +.008 I->T and +.004 I->I at 64 bits.
    epochs: int = 50
    batch_size: int = 128
    hidden: int = 4096
    tau: float = 1.0  # NT-Xent temperature
    w_inter: float = 1.0  # (image, caption)
    w_image: float = 1.0  # (image, augmented image)
    w_text: float = 1.0  # (caption, second caption)
    # Beyond the paper (0 = off): more cross-modal positives from the views already in the batch.
    w_inter_second: float = 0.0  # (image, second caption)
    w_inter_views: float = 0.0  # (augmented image, second caption)
    # Image against all its captions at once, every caption a positive (losses.all_captions_contrastive). On UCM,
    # weight 2 at 16 bits: T->I .982 against .979 over 6 seeds (std .007, so noise), I->T and I->I .003-.005
    # lower; weight 1 lowered 32- and 64-bit I->T by .005. Off: UCM's five captions are near-duplicates; datasets
    # with more varied captions may differ.
    w_inter_all: float = 0.0
    # NT-Xent of the image's and caption's sign codes (losses.binary_nt_xent): the Hamming similarity search ranks
    # by, which the continuous codes' cosine only approaches. On UCM, weight 1 at 16 bits over 6 seeds: I->T
    # .933 / T->I .981 / I->I .909 against .928 / .979 / .906 (gains inside the seed noise); at 32 and 64 bits it
    # cost .007 of I->T (3 seeds). Off.
    w_inter_binary: float = 0.0
    # UCCH-style (Hu et al., TPAMI 2022): each code also contrasts with a momentum-updated bank holding the
    # other modality's binary code of every training item: N - 1 negatives instead of 2 x batch - 2.
    w_bank: float = 0.0
    bank_momentum: float = 0.5
    bank_tau: float = 0.2
    # A robustness study, not a training method: this share of the training items trains with another training
    # item's captions (pipeline.noise.swap_captions, drawn with split_seed so every training seed sees the same
    # wrong pairs); evaluation keeps the true ones. bench/caption_noise.py sweeps it.
    caption_noise: float = 0.0
    # Training for wrong captions: the (image, caption) term weights each item by the probability that its pair is
    # right (pipeline.noise.clean_probability over the items' image-caption code cosines, refit every epoch after
    # robust_warmup epochs; weights 1 until then). UCM, 64 bits, 3 seeds: with half the training captions wrong
    # (caption_noise=0.5) I->T / T->I / I->I .915 / .977 / .897 against .757 / .927 / .676; on the clean captions
    # .931 / .976 / .911 against .971 / .993 / .961, since the mixture splits the right pairs too. Off.
    robust_inter: bool = False
    robust_warmup: int = 5
    # An image's code is the mean of the image head's outputs over the image and its cached augmented views, then
    # its sign (test-time augmentation over the views extract made for training; encode-archive and search do
    # the same). UCM, 3 seeds, I->T / T->I / I->I: 16 bits .959 / .978 / .937 against .932 / .975 / .910 from the
    # image alone; 64 bits .971 / .993 / .961 against .955 / .992 / .947. Paper: the image alone.
    view_ensemble: bool = True
    drop_last: bool = False  # skip an epoch's last batch when it is smaller than batch_size
    augment_anchor: bool = False  # the image pair is any two distinct of {original, cached views}, not (original, view)
    alpha: float = 0.01  # adversarial
    beta: float = 0.01  # quantization, at 64 bits; paper: 0.001 (10x gave +.002 I->T and +.004 I->I at 64 bits)
    # The quantization weight is beta x K / 64 at K bits: strong quantization helps long codes and hurts short
    # ones (T->I at 16 bits: .970 with 0.01, .975 with 0.0025). Paper: beta at every length.
    beta_scales_with_bits: bool = True
    gamma: float = 0.01  # bit balance
    gp_weight: float = 10.0
    lr: float = 1e-4
    weight_decay: float = 5e-4
    disc_lr: float = 1e-4
    disc_betas: tuple[float, float] = (0.5, 0.9)
    disc_weight_decay: float = 1e-4
    lr_step: int = 25  # epochs between learning-rate decays; paper: 50 (of 100 epochs: one decay half way)
    lr_decay: float = 0.8
    reference_quirks: bool = False  # the public code's defects: text view 2 = view 1; adversary on text codes
    eval_every: int = 10  # epochs between validation mAPs (and at the end)
    map_k: int = 20
    # The heads' matmuls under bf16 autocast (3x faster on CPUs with AVX512-BF16, same mAP) or fp32;
    # "auto": bf16 on a GPU or a CPU with native bf16, else fp32. Resolved before the run is fingerprinted.
    precision: str = "auto"
    device: str = "auto"
    # GPU only, never changing the math: replay the steps as CUDA graphs (7x faster at UCM scale), and
    # optionally torch.compile the loss terms inside them (+10% steps/s after ~20 s of compilation).
    cuda_graphs: bool = True
    compile_terms: bool = False
    # Epochs between checkpoints (0: none): a killed run resumes from the last one and ends with the weights an
    # uninterrupted run gets (bit for bit on a CPU). Removed when the code length finishes.
    checkpoint_every: int = 10

    RUNTIME_FIELDS = ("device", "run", "eval_every", "cuda_graphs", "compile_terms", "checkpoint_every")
    # Options added after runs were trained without them. While off they change no byte, so they stay out of the
    # fingerprint then: a run trained before they existed is still up to date, not trained again.
    LATER_OPTIONS = ("w_inter_all", "w_inter_binary", "caption_noise", "robust_inter", "view_ensemble")
    LATER_SETTINGS = {"robust_warmup": "robust_inter"}  # a later option's own settings: out while it is off

    def quantization_weight(self, bits: int) -> float:
        return self.beta * bits / 64 if self.beta_scales_with_bits else self.beta

    @classmethod
    def recipe(cls, name: str, **fields) -> "TrainConfig":
        """A config from named settings (TRAIN_RECIPES), with `fields` on top."""
        from pipeline import DuchError

        if name not in TRAIN_RECIPES:
            raise DuchError(f"--recipe {name!r}: unknown; use one of {', '.join(TRAIN_RECIPES)}")
        return cls(**{**TRAIN_RECIPES[name], **fields})

    def validate(self) -> None:
        from pipeline import DuchError

        if not self.bits:
            raise DuchError("--bits: give at least one code length")
        for k in self.bits:
            if k <= 0 or k % 8:
                raise DuchError(f"--bits {k}: code lengths must be positive multiples of 8 (e.g. 16,32,64,128)")
        if self.split not in ("paper", "dataset", "all"):
            raise DuchError(f"--split must be paper, dataset or all, got {self.split!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise DuchError("--epochs must be at least 1 and --batch-size at least 2 (BatchNorm needs 2 items)")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise DuchError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.tau <= 0:
            raise DuchError(f"--tau must be positive, got {self.tau}")
        if not 0 <= self.caption_noise <= 1:
            raise DuchError(f"caption_noise is the share of training items given wrong captions, from 0 to 1; got "
                            f"{self.caption_noise}")
        if self.robust_warmup < 0:
            raise DuchError(f"robust_warmup is a number of epochs (0 or more), got {self.robust_warmup}")
        if self.checkpoint_every < 0:
            raise DuchError(f"--checkpoint-every must be 0 (off) or a number of epochs, got {self.checkpoint_every}")

    def output_settings(self) -> dict:
        out = output_settings(self)
        for name, option in self.LATER_SETTINGS.items():
            if not out[option]:
                del out[name]
        for name in self.LATER_OPTIONS:
            if not out[name]:
                del out[name]
        return out


@dataclass
class EncodeConfig:
    """Stage 3: codes for every item of an archive (an extract run) from a trained train-hash run."""

    run: str  # run directory holding the trained train-hash stage
    archive: str | None = None  # run directory of the archive's extract stage; None: `run` itself
    bits: tuple[int, ...] | None = None  # None: every trained code length
    continuous: bool = False  # also store the heads' float16 outputs, for `search --rerank`
    index: str | None = None  # also write a faiss index per code length: "flat", "ivf" or "hnsw"
    device: str = "auto"
    batch_size: int = 8192
    scheduler: str = "none"  # as for extract: one task per archive shard, here or on a dask cluster
    threads: int | None = None  # torch threads per encoding process, as for extract

    RUNTIME_FIELDS = ("device", "batch_size", "scheduler", "threads")

    def validate(self) -> None:
        from pipeline import DuchError

        if self.batch_size < 1:
            raise DuchError(f"--batch-size must be at least 1, got {self.batch_size}")
        for k in self.bits or ():
            if k <= 0 or k % 8:
                raise DuchError(f"--bits {k}: code lengths are positive multiples of 8")
        if self.index not in (None, "flat", "ivf", "hnsw"):
            raise DuchError(f"--index must be flat, ivf or hnsw, got {self.index!r}")
        _check_scheduler(self.scheduler)
        if self.threads is not None and self.threads < 1:
            raise DuchError(f"--threads must be at least 1, got {self.threads}")


@dataclass
class EvaluateConfig:
    """Retrieval metrics of a run's codes on its held-out split."""

    run: str  # run directory with train-hash and encode-archive stages
    bits: tuple[int, ...] | None = None  # None: every encoded code length
    k: int = 20  # mAP@K
    rerank: int = 100  # Hamming shortlist re-ranked with the continuous outputs (when stored); 0: off

    RUNTIME_FIELDS = ()

    def validate(self) -> None:
        from pipeline import DuchError

        if self.k < 1:
            raise DuchError(f"--k must be at least 1, got {self.k}")
        if self.rerank < 0:
            raise DuchError(f"--rerank must be 0 (off) or a shortlist size, got {self.rerank}")
