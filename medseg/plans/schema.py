"""``plans.json``: the typed, versioned contract between planning, training and inference.

Everything the trainer and predictor need is here; nothing is added at run time. A user may edit
the file and re-run. Unknown keys are rejected (``extra="forbid"``) so that typos fail loudly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medseg.errors import PlanError
from medseg.utils import IGNORE_LABEL_NAME, atomic_write_text, load_json_model, look_up

SCHEMA_VERSION = 1
ConfigName = Literal["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
# Preprocessed label maps hold class indices as int8 (-1: outside the image), so a dataset may have at
# most 127 classes (background included); every dataset we know fits (TotalSegmentator v2: 118).
MAX_CLASSES = 127


def ignore_value(labels: Mapping[int, str]) -> int | None:
    """The value of the label named ``ignore`` (nnU-Net v2's convention for unannotated voxels: the
    highest value, in training labels only), None when the dataset declares none."""
    found = [int(v) for v, name in labels.items() if str(name).strip().lower() == IGNORE_LABEL_NAME]
    return found[0] if found else None


def label_values(labels: Iterable[int] | Mapping[int, str]) -> list[int]:
    """A dataset's label values in class order: class ``k`` is the ``k``-th smallest value, so the
    background 0 is class 0 and consecutive labels 0..K-1 are their own classes ({0, 1, 255} → 0, 1, 2).
    Given a mapping value → name, the ignore label (:func:`ignore_value`) is no class: the
    preprocessed maps hold it as class index K, one past the network's outputs."""
    skip = ignore_value(labels) if isinstance(labels, Mapping) else None
    return sorted({0, *(int(v) for v in labels if int(v) != skip)})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Normalization(_Model):
    """Per-channel intensity normalisation. ``ct``: clip to foreground p0.5/p99.5, then z-score with
    the foreground mean/std. ``zscore``: per-image z-score (inside the nonzero mask when
    ``use_mask``). ``none``: unchanged."""

    scheme: Literal["ct", "zscore", "none"]
    use_mask: bool = False
    mean: float | None = None
    std: float | None = None
    lower: float | None = None
    upper: float | None = None


class Blocks(_Model):
    """Block variants, combinable (``reversible`` replaces the stage blocks, so only with
    ``encoder_block: plain``). ``encoder_block`` names a block registered in
    ``medseg.networks.variants`` (``plain``, ``residual``, …), checked when the network is built.
    ``bottleneck: graph`` replaces the deepest stage's convs by graph convolutions over its voxels
    (grid + feature-space kNN adjacency)."""

    encoder_block: str = "plain"
    attention_gates: bool = False
    squeeze_excitation: Literal["none", "cse", "sse", "scse"] = "none"
    se_reduction: int = 2
    reversible: bool = False
    bottleneck: Literal["conv", "graph"] = "conv"


class Architecture(_Model):
    """U-Net topology. ``strides[i]`` downsamples into stage i (``strides[0]`` is all ones)."""

    features: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    convs_per_stage: int = 2
    encoder_units_per_stage: list[int] | None = None  # residual encoder: units per stage (ResEnc presets)
    deep_supervision: bool = True
    blocks: Blocks = Field(default_factory=Blocks)

    @model_validator(mode="after")
    def _same_depth(self) -> Architecture:
        if not (len(self.features) == len(self.kernel_sizes) == len(self.strides)):
            raise ValueError("features, kernel_sizes and strides need one entry per stage")
        return self

    @property
    def num_stages(self) -> int:
        return len(self.features)


class Training(_Model):
    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    optimizer: Literal["sgd"] = "sgd"
    initial_lr: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    oversample_foreground: float = 0.33
    mirror_axes: list[int]
    time_budget_min: float | None = None


class MemoryTrade(_Model):
    """What a memory-saving variant bought: its patch against the patch the same budget gives without it."""

    versus: str
    patch_size: list[int]
    versus_patch_size: list[int]
    voxel_ratio: float
    note: str


class MemoryEstimate(_Model):
    """What justified patch and batch size: the memory model's estimate of one training step's peak
    (stored activations + the largest block's backward workspace + weights, gradients and momentum)."""

    budget_gb: float
    estimate_gb: float
    activations_gb: float
    workspace_gb: float = 0.0
    weights_gb: float
    flops_per_step: float
    step_seconds_estimate: float | None = None
    decision: str
    trade: MemoryTrade | None = None


class Configuration(_Model):
    """One trainable configuration. ``name`` is the data configuration (it decides preprocessing);
    ``variant`` names the network's block variant; both together make the ``key`` under which it
    is stored in ``plans.json`` and trained (``runs/<key>/``)."""

    name: ConfigName
    variant: str = "plain"
    inherits_from: str | None = None
    spacing: list[float]
    transpose_forward: list[int]
    median_shape: list[int]
    patch_size: list[int]
    batch_size: int
    normalization: list[Normalization]
    architecture: Architecture
    training: Training
    memory: MemoryEstimate
    previous_stage: str | None = None

    @property
    def dim(self) -> int:
        return len(self.patch_size)

    @property
    def key(self) -> str:
        return self.name if self.variant == "plain" else f"{self.name}_{self.variant}"

    @property
    def data_config(self) -> str:
        """The configuration whose preprocessed data this one trains on (the cascade's full-resolution
        stage shares ``3d_fullres``'s)."""
        return "3d_fullres" if self.name == "3d_cascade_fullres" else self.name

    @property
    def transpose_backward(self) -> list[int]:
        return [self.transpose_forward.index(i) for i in range(len(self.transpose_forward))]


class Plans(_Model):
    schema_version: int = SCHEMA_VERSION
    dataset_name: str
    channel_names: list[str]
    labels: dict[int, str]
    device: Literal["cpu", "cuda"]
    seed: int = 0
    configurations: dict[str, Configuration]
    medseg_version: str
    # the configuration(s) `medseg train` and `medseg demo` train when none is named, and why the
    # planner chose them for the budget (empty in plans made before the planner chose)
    recommended: list[str] = Field(default_factory=list)
    recommendation: str = ""
    # `medseg plan --plans-from`: the trained work directory whose configurations these are (so that
    # its weights fit, `medseg train --init-from`); empty for plans made for this dataset alone
    transferred_from: str = ""

    def config(self, name: str) -> Configuration:
        return self.configurations[look_up(name, self.configurations, "configuration")]

    def default_configurations(self) -> list[str]:
        """What to train when no configuration is named: :attr:`recommended`, else 3d_fullres (when
        planned), else the first configuration."""
        if self.recommended:
            return list(self.recommended)
        return ["3d_fullres"] if "3d_fullres" in self.configurations else list(self.configurations)[:1]

    @property
    def label_values(self) -> list[int]:
        """The label value of each class (see :func:`label_values`): files hold these, the network classes."""
        return label_values(self.labels)

    @property
    def num_classes(self) -> int:
        """The network's outputs: one per label value (background included), however sparse the
        values; the ignore label is none of them."""
        return len(self.label_values)

    @property
    def ignore_value(self) -> int | None:
        """The ignore label's value in the dataset's files (None without one)."""
        return ignore_value(self.labels)

    @property
    def ignore_class(self) -> int | None:
        """The ignore label's class index in preprocessed maps and training targets: ``num_classes``."""
        return None if self.ignore_value is None else self.num_classes

    @property
    def class_labels(self) -> dict[int, str]:
        """:attr:`labels` without the ignore label: the classes a prediction holds."""
        return {k: v for k, v in self.labels.items() if k != self.ignore_value}

    def input_channels(self, config: Configuration) -> int:
        """Image channels, plus one per foreground class (the one-hot previous-stage segmentation) for a cascade."""
        return len(self.channel_names) + (self.num_classes - 1 if config.previous_stage else 0)

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> Plans:
        return load_json_model(cls, path, missing="plans file not found; run `medseg plan` first",
                               schema_version=SCHEMA_VERSION, error=PlanError)


MODEL_SCHEMA_VERSION = 1


class Postprocessing(_Model):
    """Keep the largest connected component of all foreground (``foreground``) and/or of each class in ``classes``."""

    foreground: bool = False
    classes: list[int] = Field(default_factory=list)


class QualityControl(_Model):
    """Per-case QC: the mean normalised entropy inside the predicted foreground (mean over models);
    cases scoring above ``threshold`` are flagged. ``threshold`` is the ``quantile`` of the
    out-of-fold scores of the chosen model."""

    threshold: float
    quantile: float
    spearman_vs_dice: float
    worst_flagged: str


class InferenceChoice(_Model):
    """Mirroring at prediction time, decided on the out-of-fold predictions: off when the chosen
    model's foreground Dice without it is within ``tolerance`` of the Dice with it (8 mirrorings
    cost 8× the network passes). ``None`` figures: folds validated before this was measured."""

    mirroring: bool = True
    dice_with_mirroring: float | None = None
    dice_without_mirroring: float | None = None
    tolerance: float = 0.005
    decided: str = "mirroring on (not measured)"
    # the forward pass's backend (medseg.inference.backends), switched from torch by `medseg find-best
    # --try-backends` when its out-of-fold foreground Dice is within ``tolerance`` of torch's
    backend: str = "torch"
    dice_torch: float | None = None
    dice_backend: dict[str, float] = Field(default_factory=dict)
    backend_decided: str = "torch (not measured)"


class ChosenModel(_Model):
    """``model.json``, written by ``medseg find-best`` and read by ``medseg predict -m WORKDIR``:
    which configurations (softmax-averaged) and folds to use, and the postprocessing."""

    schema_version: int = MODEL_SCHEMA_VERSION
    members: list[str]
    folds: dict[str, list[int | str]]
    postprocessing: Postprocessing = Field(default_factory=Postprocessing)
    qc: QualityControl | None = None
    inference: InferenceChoice = Field(default_factory=InferenceChoice)
    cv_dice: float
    cv_dice_per_class: dict[str, float]
    cv_hd95: float | None = None
    cv_cases: int
    decided: str

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> ChosenModel:
        return load_json_model(cls, path, missing="model file not found; run `medseg find-best` first",
                               schema_version=MODEL_SCHEMA_VERSION, error=PlanError)
