"""Stage 2's settings: DUCH's weights and hyper-parameters, the recipes, and the options beyond the paper.

Every figure behind a default or an option is in docs/results.md ("Training options measured").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from duch.pipeline import DuchError
from duch.pipeline.config.fields import output_settings

# DUCH's published training settings (docs/design.md, 2.6) where TrainConfig's defaults depart from them; the
# defaults measured better on UCM-captions (docs/results.md, 2.1 and 2.5).
PAPER_TRAINING = {"batch_size": 256, "epochs": 100, "lr_step": 50, "beta": 0.001, "beta_scales_with_bits": False,
                  "view_ensemble": False}
# Named settings, as open_clip names model configs: "duch" is the defaults, "paper" the published values.
TRAIN_RECIPES = {"duch": {}, "paper": PAPER_TRAINING}


@dataclass
class TrainConfig:
    """Stage 2. Every weight and hyper-parameter of DUCH (docs/design.md, 2) is a field; the defaults are the
    paper's except those in PAPER_TRAINING (`recipe("paper")` restores them). Options beyond the paper are off
    unless a field says otherwise; what each measured is in docs/results.md, 2.5."""

    run: str  # run directory holding a finished extract stage; writes RUN/train-hash
    bits: tuple[int, ...] = (16, 32, 64, 128)
    split: str = "paper"  # "paper" (seed 42: 50% train, 20%/80% of the rest query/database), "dataset", "all"
    split_seed: int = 42
    seed: int = 0
    epochs: int = 50  # paper: 100 epochs of batch 256; half of each takes 450 steps on UCM to its 500
    batch_size: int = 128
    hidden: int = 4096
    tau: float = 1.0  # NT-Xent temperature
    w_inter: float = 1.0  # (image, caption)
    w_image: float = 1.0  # (image, augmented image)
    w_text: float = 1.0  # (caption, second caption)
    # More cross-modal positives from the views already in the batch.
    w_inter_second: float = 0.0  # (image, second caption)
    w_inter_views: float = 0.0  # (augmented image, second caption)
    # Image against all its captions at once, every caption a positive (losses.all_captions_contrastive): for
    # datasets whose captions vary more than UCM's near-duplicates.
    w_inter_all: float = 0.0
    # NT-Xent of the image's and caption's sign codes (losses.binary_nt_xent): the Hamming similarity search ranks
    # by, which the continuous codes' cosine only approaches.
    w_inter_binary: float = 0.0
    # UCCH-style (Hu et al., TPAMI 2022): each code also contrasts with a momentum-updated bank holding the
    # other modality's binary code of every training item: N - 1 negatives instead of 2 x batch - 2.
    w_bank: float = 0.0
    bank_momentum: float = 0.5
    bank_tau: float = 0.2
    # A robustness study, not a training method: this share of the training items trains with another training
    # item's captions (model/noise.swap_captions, drawn with split_seed so every training seed sees the same
    # wrong pairs); evaluation keeps the true ones. bench/caption_noise.py sweeps it.
    caption_noise: float = 0.0
    # Training for wrong captions: the (image, caption) term weights each item by the probability that its pair is
    # right (model/noise.clean_probability over the items' image-caption code cosines, refit every epoch after
    # robust_warmup epochs; weights 1 until then). It splits right pairs too, so clean captions lose by it.
    robust_inter: bool = False
    robust_warmup: int = 5
    # Matryoshka-style nested codes (Kusupati et al., NeurIPS 2022): DUCH's three contrastive terms also on the
    # codes' first nested_bits bits, weighted w_nested, so that prefix serves as a shorter code (0: off).
    nested_bits: int = 0
    w_nested: float = 1.0
    # An image's code is the mean of the image head's outputs over the image and its cached augmented views, then
    # its sign: test-time augmentation over the views extract made for training, at no cost per code;
    # encode-archive and search do the same. Paper: the image alone.
    view_ensemble: bool = True
    drop_last: bool = False  # skip an epoch's last batch when it is smaller than batch_size
    augment_anchor: bool = False  # the image pair is any two distinct of {original, cached views}, not (original, view)
    alpha: float = 0.01  # adversarial
    beta: float = 0.01  # quantization, at 64 bits; paper: 0.001
    # The quantization weight is beta x K / 64 at K bits: strong quantization helps long codes and hurts short
    # ones. Paper: beta at every length.
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
    # The heads' matmuls under bf16 autocast or fp32; "auto": bf16 on a GPU or a CPU with native bf16, else fp32.
    # Resolved before the run is fingerprinted.
    precision: str = "auto"
    device: str = "auto"
    # GPU only, never changing the math: replay the steps as CUDA graphs, and optionally torch.compile the loss
    # terms inside them (worth its ~20 s of compilation per code length on long runs only).
    cuda_graphs: bool = True
    compile_terms: bool = False
    # Epochs between checkpoints (0: none): a killed run resumes from the last one and ends with the weights an
    # uninterrupted run gets (bit for bit on a CPU). Removed when the code length finishes.
    checkpoint_every: int = 10

    RUNTIME_FIELDS = ("device", "run", "eval_every", "cuda_graphs", "compile_terms", "checkpoint_every")
    # Options added after runs were trained without them. While off they change no byte, so they stay out of the
    # fingerprint then: a run trained before they existed is still up to date, not trained again.
    LATER_OPTIONS = ("w_inter_all", "w_inter_binary", "caption_noise", "robust_inter", "view_ensemble", "nested_bits")
    # A later option's own settings: out of the fingerprint while their option is off.
    LATER_SETTINGS = {"robust_warmup": "robust_inter", "w_nested": "nested_bits"}

    def quantization_weight(self, bits: int) -> float:
        return self.beta * bits / 64 if self.beta_scales_with_bits else self.beta

    @classmethod
    def recipe(cls, name: str, **fields) -> TrainConfig:
        """A config from named settings (TRAIN_RECIPES), with `fields` on top."""
        if name not in TRAIN_RECIPES:
            raise DuchError(f"`recipe` {name!r}: unknown; use one of {', '.join(TRAIN_RECIPES)}")
        return cls(**{**TRAIN_RECIPES[name], **fields})

    def validate(self) -> None:
        if not self.bits:
            raise DuchError("`bits`: give at least one code length")
        for k in self.bits:
            if k <= 0 or k % 8:
                raise DuchError(f"`bits` {k}: code lengths must be positive multiples of 8 (e.g. 16,32,64,128)")
        if self.split not in ("paper", "dataset", "all"):
            raise DuchError(f"`split` must be paper, dataset or all, got {self.split!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise DuchError("`epochs` must be at least 1 and `batch_size` at least 2 (BatchNorm needs 2 items)")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise DuchError(f"`precision` must be auto, bf16 or fp32, got {self.precision!r}")
        if self.tau <= 0:
            raise DuchError(f"`tau` must be positive, got {self.tau}")
        if not 0 <= self.caption_noise <= 1:
            raise DuchError(f"caption_noise is the share of training items given wrong captions, from 0 to 1; got "
                            f"{self.caption_noise}")
        if self.robust_warmup < 0:
            raise DuchError(f"robust_warmup is a number of epochs (0 or more), got {self.robust_warmup}")
        if self.nested_bits and (self.nested_bits < 0 or self.nested_bits % 8 or self.nested_bits >= min(self.bits)):
            raise DuchError(f"nested_bits is a shorter code inside every trained one: a positive multiple of 8 below "
                            f"every `bits` ({min(self.bits)}), or 0 for none; got {self.nested_bits}")
        if self.checkpoint_every < 0:
            raise DuchError(f"`checkpoint_every` must be 0 (off) or a number of epochs, got {self.checkpoint_every}")
        self.validate_ranges()

    # The ranges of the settings `--set` reaches: a value outside is refused in one line naming it, never an
    # optimizer's traceback, a run training on NaN, or a model too large for memory.
    WEIGHTS = ("w_inter", "w_image", "w_text", "w_inter_second", "w_inter_views", "w_inter_all", "w_inter_binary",
               "w_bank", "w_nested", "alpha", "beta", "gamma", "gp_weight", "weight_decay", "disc_weight_decay")
    POSITIVE = ("bank_tau", "lr", "disc_lr", "lr_decay")  # tau: validate names it with the others that have options
    AT_LEAST_ONE = ("lr_step", "map_k", "eval_every")
    MOST_BITS, MOST_HIDDEN = 4096, 65_536  # a 65536-wide head on 1280-d features is ~1.3 GB to train

    def validate_ranges(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise DuchError(f"{f.name} must be a finite number, got {value}")
        for name in self.WEIGHTS:
            if getattr(self, name) < 0:
                raise DuchError(f"{name} is a loss weight: 0 or more, got {getattr(self, name)}")
        for name in self.POSITIVE:
            if getattr(self, name) <= 0:
                raise DuchError(f"{name} must be positive, got {getattr(self, name)}")
        for name in self.AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise DuchError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.bank_momentum <= 1:
            raise DuchError(f"bank_momentum must be from 0 to 1, got {self.bank_momentum}")
        betas = self.disc_betas
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise DuchError(f"disc_betas are Adam's two betas, each from 0 to below 1 (like 0.5,0.9); got {betas}")
        if self.split_seed < 0:
            raise DuchError(f"split_seed must be 0 or more, got {self.split_seed}")
        if not 1 <= self.hidden <= self.MOST_HIDDEN or max(self.bits) > self.MOST_BITS:
            raise DuchError(f"`hidden` must be from 1 to {self.MOST_HIDDEN} and `bits` at most {self.MOST_BITS}; got "
                            f"{self.hidden} and {max(self.bits)}")

    def output_settings(self) -> dict:
        out = output_settings(self)
        for name, option in self.LATER_SETTINGS.items():
            if not out[option]:
                del out[name]
        for name in self.LATER_OPTIONS:
            if not out[name]:
                del out[name]
        return out
