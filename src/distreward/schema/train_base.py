"""The schema of `distreward train-base`: flow matching with power-EMA snapshots (distreward.train.train_base;
docs/training.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .core import Partial, fail, key, section
from .keys import ARCHS, EMA_STD_MAX, check_export_std, dry_run_key, dry_run_of_key, name_key, nonempty, seed_key


@dataclass
class Data:
    images: str = key("fmnist-train", "training images: fmnist-train, fmnist-test, an .npz or an image folder")
    limit: int = key(0, "use the first `limit` images (0: all)", ge=0)


@dataclass
class Network:
    arch: str = key("unet", "network family", choices=ARCHS)
    kwargs: dict = key({}, "network keywords (img_resolution, img_channels, num_classes default to the data's); "
                           "free-form")


@dataclass
class Train:
    total_kimg: float = key(256.0, "training length in thousands of images", gt=0)
    batch: int = key(128, "batch size", ge=1)
    lr: float = key(2e-3, "AdamW learning rate after the warm-up", ge=0)
    lr_rampup_kimg: float = key(12.8, "linear warm-up length (kimg)", ge=0)
    lr_decay_kimg: float = key(0.0, "0: constant after the warm-up; > 0: lr / sqrt(kimg / lr_decay_kimg)", ge=0)
    betas: list[float] = key([0.9, 0.99], "AdamW betas", ge=0, lt=1, length=2)
    eps: float = key(1e-8, "AdamW eps", gt=0)
    weight_decay: float = key(0.0, "AdamW weight decay", ge=0)
    grad_clip: Optional[float] = key(1.0, "gradient-norm clip (0 or null: none)", ge=0)
    label_dropout: float = key(0.1, "share of labels replaced by the null label (classifier-free guidance)", ge=0,
                               le=1)
    sigma_sampling: str = key("logit_normal", "noise-level distribution", choices=("logit_normal", "uniform"))
    logit_mean: float = key(0.0, "logit_normal: mean")
    logit_std: float = key(1.0, "logit_normal: std", gt=0)
    channels_last: bool = key(True, "memory format of the training network (faster CPU convolutions)")
    compile: bool = key(False, "torch.compile the training network: a one-off compile (about a minute), then steps "
                               "0-8% faster on a 2-core CPU (benchmarks/train_step.py); float rounding differs from "
                               "eager")


@dataclass
class EMA:
    stds: list[float] = key([0.050, 0.100], "the power-function EMA profiles tracked (sigma_rel)", gt=0, lt=EMA_STD_MAX,
                            check=nonempty, why="power-EMA profiles")
    snapshot_kimg: float = key(25.6, "kimg between EMA snapshots (snapshots/)", gt=0)
    export_std: Optional[float] = key(0.100, "model.safetensors: the post-hoc EMA at this std, at the end",
                                      check=check_export_std)
    export_method: str = key("continuous", "post-hoc EMA solve", choices=("continuous", "discrete"))


@dataclass
class TrainBase:
    """`distreward train-base`: flow-matching training with power-function EMA snapshots (--device on the CLI)."""
    name: str = name_key("base")
    seed: int = seed_key()
    data: Data = section(Data, "training data")
    network: Network = section(Network, "the generator")
    train: Train = section(Train, "optimisation")
    ema: EMA = section(EMA, "power-function EMAs and post-hoc EMA export")
    log_kimg: float = key(1.28, "kimg between log records", gt=0)
    checkpoint_kimg: float = key(12.8, "kimg between training-state checkpoints", gt=0)
    tensorboard: bool = key(True, "also log to TensorBoard (tb/)")
    dry_run: Optional[Partial] = dry_run_key()
    dry_run_of: Optional[str] = dry_run_of_key()


def check_train_base(cfg: dict) -> None:
    """Checks across keys of a train-base config (defaults merged)."""
    limit, batch = cfg["data"]["limit"], cfg["train"]["batch"]
    if 0 < limit < batch:
        fail("train.batch", batch, f"<= data.limit = {limit}: a batch cannot exceed the dataset")
