"""Reward objects: images (+ labels, + group ids) -> one float32 reward per image, higher is better.

`DistributionReward` is the method's subset-replace FD reward (METHOD.md §3), `ClassDistributionReward` the same
with one reference set per class (credit for what a sample fixes in its own class); `ClassifierLogProbReward` and
`KNNRealismReward` are the sample-wise baselines of METHOD.md §6, kept simple: they exist to show reward hacking.
All return CPU float32 tensors (B,).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from omegaconf import OmegaConf

from ..features import get_feature_network
from ..metrics import GaussianStats
from ..schema import REWARD_KEYS
from ..utils.errors import reading
from .reference import CREDITS, MODES, ReferenceSet


class Reward:
    """The interface of every reward, in three parts so that a caller can split the work (across ranks: features
    computed locally, rows gathered, pushed alike everywhere):

    - `features(images) -> f`: what the reward needs of each image (feature rows, logits, or the images);
    - `score_features(f, labels, groups=None) -> (B,)` CPU float32 rewards, higher is better;
    - `push_features(f, labels)`: the step's new rows enter the reward's state (sample-wise rewards keep none).

    `keeps_state` says whether push_features changes anything (otherwise callers need not gather the rows);
    `fd()` is the reference set's FD for logging (None without one). `reward(images, labels, groups)` and
    `after_step(images, labels)` are the same built from the parts."""

    name = "reward"
    keeps_state = False

    def features(self, images: torch.Tensor):
        """The images themselves (a reward that needs no network)."""
        return images

    def score_features(self, features, labels: torch.Tensor | None, groups=None) -> torch.Tensor:
        raise NotImplementedError

    def push_features(self, features, labels: torch.Tensor | None = None) -> None:
        """Sample-wise rewards have nothing to update."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None, groups=None) -> torch.Tensor:
        return self.score_features(self.features(images), labels, groups)

    def after_step(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Called once per RL step with that step's samples."""
        self.push_features(self.features(images), labels)

    def fd(self) -> float | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


def _net_device(net: torch.nn.Module) -> torch.device:
    p = next(iter(net.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _numpy(x) -> np.ndarray | None:
    return None if x is None else np.asarray(x.cpu() if torch.is_tensor(x) else x)


def _check_batch(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"images must be a float tensor (B, C, H, W) in [-1, 1], got "
                         f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")


@torch.no_grad()
def _features(net: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Float32 features (B, d) on the network's device."""
    device = _net_device(net)
    out = [net(images[i:i + batch_size].to(device)).float() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


class ScoredBatchFeatures:
    """features(images) -> (B, d) float64 rows of the feature network, remembering the last batch's: a set reward's
    after_step pushes the batch it has just scored without a second pass through the network."""

    def __init__(self, net: torch.nn.Module, batch_size: int):
        self.net, self.batch_size = net, int(batch_size)
        self._last = None  # (images, version, features)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        _check_batch(images)
        last = self._last
        if last is not None and last[0] is images and last[1] == images._version:
            return last[2]
        f = _features(self.net, images, self.batch_size).double().cpu().numpy()
        self._last = (images, images._version, f)
        return f

    def forget(self) -> None:
        self._last = None


class DistributionReward(Reward):
    """r(x) = FD(G) - FD(G - {s} + {x}) in the feature space of `feature_net` (METHOD.md §3).

    mode: "fast" (exact, default) | "exact" (brute force) | "linear"; credit: "sample" | "group" (docs/reward.md).
    `scale` multiplies the rewards (e.g. N, to make them of the order of the FD itself); it does not change ranks.
    `push_features` puts the step's features into the reference set (the oldest rows go).
    """

    name = "distribution"
    keeps_state = True

    def __init__(self, feature_net: torch.nn.Module, reference_set: ReferenceSet, *, mode: str = "fast",
                 credit: str = "sample", scale: float = 1.0, batch_size: int = 500):
        ReferenceSet._check_mode(mode, credit)
        if getattr(feature_net, "dim", reference_set.dim) != reference_set.dim:
            raise ValueError(f"feature network gives {feature_net.dim}-d features but the reference set is "
                             f"{reference_set.dim}-d: build both with the same network")
        self.net, self.ref = feature_net, reference_set
        self.mode, self.credit, self.scale, self.batch_size = mode, credit, float(scale), int(batch_size)
        self.scored = ScoredBatchFeatures(feature_net, self.batch_size)

    def features(self, images) -> np.ndarray:
        return self.scored(images)

    def score_features(self, features, labels=None, groups=None) -> torch.Tensor:
        r = self.ref.rewards(features, groups=_numpy(groups), mode=self.mode, credit=self.credit)
        return torch.from_numpy(np.asarray(r) * self.scale).float()

    def push_features(self, features: np.ndarray, labels=None) -> None:
        """Push (B, d) feature rows into the reference set (the oldest rows go) and forget the cached features of
        the last scored batch."""
        self.ref.push(features)
        self.scored.forget()

    def fd(self) -> float:
        return self.ref.fd()

    def state_dict(self) -> dict:
        return {"reference_set": self.ref.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.ref.load_state_dict(sd["reference_set"])


class ClassDistributionReward(Reward):
    """The distribution-wise reward with one reference set per class (reward.per_class): a sample of class c is
    scored by what it does to class c's set against class c's real statistics, r(x) = FD_c(G_c) -
    FD_c(G_c - {s} + {x}), so it is credited for what it fixes in its own class; after a step each class's set takes
    that class's new rows. `fd()` is the mean of the classes' FDs."""

    name = "distribution"
    keeps_state = True

    def __init__(self, feature_net: torch.nn.Module, sets: Mapping[int, ReferenceSet], *, mode: str = "fast",
                 credit: str = "sample", scale: float = 1.0, batch_size: int = 500):
        ReferenceSet._check_mode(mode, credit)
        if not sets:
            raise ValueError("a per-class distribution reward needs at least one class's reference set")
        self.net, self.sets = feature_net, {int(c): s for c, s in sets.items()}
        self.mode, self.credit, self.scale, self.batch_size = mode, credit, float(scale), int(batch_size)
        self.scored = ScoredBatchFeatures(feature_net, self.batch_size)

    def by_class(self, labels) -> dict[int, np.ndarray]:
        """The rows of each class present in `labels` (every class must have a reference set)."""
        if labels is None:
            raise ValueError("the per-class distribution reward needs the samples' class labels")
        lab = _numpy(labels).astype(np.int64)
        missing = sorted(set(lab.tolist()) - set(self.sets))
        if missing:
            raise ValueError(f"no reference set for class(es) {missing}: the real data has no statistics for them")
        return {c: np.flatnonzero(lab == c) for c in np.unique(lab).tolist()}

    def features(self, images) -> np.ndarray:
        return self.scored(images)

    def score_features(self, features, labels=None, groups=None) -> torch.Tensor:
        r = np.zeros(features.shape[0])
        g = _numpy(groups)
        for c, idx in self.by_class(labels).items():
            r[idx] = self.sets[c].rewards(features[idx], groups=None if g is None else g[idx], mode=self.mode,
                                          credit=self.credit)
        return torch.from_numpy(r * self.scale).float()

    def push_features(self, features: np.ndarray, labels=None) -> None:
        for c, idx in self.by_class(labels).items():
            self.sets[c].push(features[idx])
        self.scored.forget()

    def fd(self) -> float:
        return float(np.mean([s.fd() for s in self.sets.values()]))

    def state_dict(self) -> dict:
        return {"reference_sets": {c: s.state_dict() for c, s in self.sets.items()}}

    def load_state_dict(self, sd: dict) -> None:
        for c, st in sd["reference_sets"].items():
            self.sets[int(c)].load_state_dict(st)


class ClassifierLogProbReward(Reward):
    """log p(label | image) under a classifier with `.logits(images) -> (B, classes)` (e.g. fmnist-reward)."""

    name = "classifier"

    def __init__(self, classifier_net: torch.nn.Module, *, batch_size: int = 500):
        if not callable(getattr(classifier_net, "logits", None)):
            raise TypeError(f"{type(classifier_net).__name__} has no .logits(images); the classifier reward needs a "
                            "classifier feature network such as 'fmnist-reward'")
        self.net, self.batch_size = classifier_net, int(batch_size)

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """log p(class | image) for every class, (B, classes) float64 on the CPU."""
        _check_batch(images)
        device = _net_device(self.net)
        return torch.cat([torch.log_softmax(self.net.logits(images[i:i + self.batch_size].to(device)).double(), 1).cpu()
                          for i in range(0, images.shape[0], self.batch_size)])

    def score_features(self, logp, labels=None, groups=None) -> torch.Tensor:
        if labels is None:
            raise ValueError("the classifier reward scores log p(label | image) and needs the intended labels")
        labels = torch.as_tensor(labels).long().reshape(-1).cpu()
        if labels.shape[0] != logp.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {logp.shape[0]} images")
        if labels.min() < 0 or labels.max() >= logp.shape[1]:
            raise ValueError(f"labels must lie in [0, {logp.shape[1]}), got [{int(labels.min())}, {int(labels.max())}]")
        return logp.gather(1, labels[:, None])[:, 0].float()


def knn_distance(feats: torch.Tensor, real: torch.Tensor, k: int, reduce: str = "kth", chunk: int = 1024) -> torch.Tensor:
    """Distance of each row of `feats` to its k-th nearest row of `real` (or the mean of the k nearest)."""
    out = []
    for i in range(0, feats.shape[0], chunk):
        d = torch.cdist(feats[i:i + chunk], real)
        near = d.topk(k, dim=1, largest=False).values
        out.append(near[:, -1] if reduce == "kth" else near.mean(1))
    return torch.cat(out)


class KNNRealismReward(Reward):
    """Minus the feature distance to the k-th nearest real feature (reduce="kth") or the mean of the k nearest."""

    name = "knn"

    def __init__(self, feature_net: torch.nn.Module, real_features, *, k: int = 3, reduce: str = "kth",
                 batch_size: int = 500):
        if reduce not in ("kth", "mean"):
            raise ValueError(f"reduce must be 'kth' or 'mean', got {reduce!r}")
        real = torch.as_tensor(np.asarray(real_features.detach().cpu() if torch.is_tensor(real_features)
                                          else real_features, dtype=np.float32))
        if real.ndim != 2 or not torch.isfinite(real).all():
            raise ValueError(f"real_features must be a finite (M, d) array, got shape {tuple(real.shape)}")
        if not 1 <= k <= real.shape[0]:
            raise ValueError(f"k must be in [1, {real.shape[0]}] (the number of real features), got {k}")
        if getattr(feature_net, "dim", real.shape[1]) != real.shape[1]:
            raise ValueError(f"real features are {real.shape[1]}-d but the network gives {feature_net.dim}-d")
        self.net, self.k, self.reduce, self.batch_size = feature_net, int(k), reduce, int(batch_size)
        self.real = real.to(_net_device(feature_net))

    def features(self, images) -> torch.Tensor:
        _check_batch(images)
        return _features(self.net, images, self.batch_size)

    def score_features(self, features, labels=None, groups=None) -> torch.Tensor:
        return (-knn_distance(features, self.real, self.k, self.reduce)).float().cpu()


# ----- construction from a config ------------------------------------------------------------------------------

def _load_array(src, what: str) -> np.ndarray:
    """An array given directly, or a path to .npy / .npz (first array; pickles refused)."""
    if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} not found; check the path in the reward config")
        with reading(path, f"{what} .npy/.npz", f"give a .npy or .npz holding the {what} as a float array"):
            z = np.load(path, allow_pickle=False)
            if isinstance(z, np.ndarray):
                return z.astype(np.float64)
            with z:
                return np.asarray(z[z.files[0]], dtype=np.float64)
    if torch.is_tensor(src):
        return src.detach().cpu().double().numpy()
    return np.asarray(src, dtype=np.float64)


def _real_mu_sigma(real_stats):
    if isinstance(real_stats, (str, bytes)) or hasattr(real_stats, "__fspath__"):
        real_stats = GaussianStats.load(real_stats)
    if isinstance(real_stats, GaussianStats):
        return real_stats.mu, real_stats.sigma
    if isinstance(real_stats, Mapping) and "mu" in real_stats and "sigma" in real_stats:
        return real_stats["mu"], real_stats["sigma"]
    if isinstance(real_stats, (tuple, list)) and len(real_stats) == 2:
        return real_stats
    raise TypeError(f"real statistics must be a GaussianStats, a (mu, sigma) pair, a dict with mu/sigma or a .npz path, "
                    f"got {type(real_stats).__name__}")


def build_reward(cfg, device="cpu", *, feature_net=None, real_stats=None, init_features=None,
                 real_features=None, class_stats=None, init_labels=None) -> Reward:
    """A reward from a config dict (keys in docs/reward.md), e.g. {"name": "distribution", "mode": "fast"}.

    Arrays given as arguments win over the paths in the config: `real_stats` (GaussianStats / (mu, sigma)),
    `init_features` (N, d) for the initial reference set, `real_features` (M, d) for the k-NN reward. With
    per_class: true the distribution reward needs `class_stats` ({class: GaussianStats}, the real data's per class)
    and `init_labels` (N,), the classes of the initial rows.
    """
    if hasattr(cfg, "_metadata"):  # an OmegaConf node
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise ValueError(f"a reward config is a dict with a 'name' ({', '.join(REWARD_KEYS)}), got {cfg!r}")
    name = str(cfg["name"])
    if name not in REWARD_KEYS:
        raise ValueError(f"unknown reward {name!r}: use one of {', '.join(REWARD_KEYS)}")
    unknown = set(cfg) - REWARD_KEYS[name]
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} for the {name!r} reward; "
                         f"allowed: {sorted(REWARD_KEYS[name])}")
    batch_size = int(cfg.get("batch_size", 500))
    if feature_net is None:
        feature_net = get_feature_network(cfg.get("features", "fmnist-reward"), weights=cfg.get("weights"), device=device)

    if name == "classifier":
        return ClassifierLogProbReward(feature_net, batch_size=batch_size)
    if name == "knn":
        real_features = real_features if real_features is not None else cfg.get("real_features")
        if real_features is None:
            raise ValueError("the knn reward needs real features: pass real_features=(M, d) or set 'real_features' to a .npy path")
        return KNNRealismReward(feature_net, _load_array(real_features, "real features"), k=int(cfg.get("k", 3)),
                                reduce=str(cfg.get("reduce", "kth")), batch_size=batch_size)

    real_stats = real_stats if real_stats is not None else cfg.get("real_stats")
    init_features = init_features if init_features is not None else cfg.get("init_features")
    if real_stats is None and not cfg.get("per_class"):
        raise ValueError("the distribution reward needs real statistics: pass real_stats= or set 'real_stats' to a .npz "
                         "made by 'distreward stats'")
    if init_features is None:
        raise ValueError("the distribution reward needs an initial reference set: pass init_features=(N, d), the features "
                         "of N samples of the starting model, or set 'init_features' to a .npy path")
    mode, credit = str(cfg.get("mode", "fast")), str(cfg.get("credit", "sample"))
    if mode not in MODES or credit not in CREDITS:
        raise ValueError(f"mode must be one of {MODES} and credit one of {CREDITS}, got {mode!r}, {credit!r}")
    options = {"eps": float(cfg.get("eps", 1e-10)), "quad_step": float(cfg.get("quad_step", 0.3)),
               "refresh_every": cfg.get("refresh_every")}
    if cfg.get("per_class"):
        return ClassDistributionReward(feature_net, class_sets(_load_array(init_features, "initial reference features"),
                                                               init_labels, class_stats, **options),
                                       mode=mode, credit=credit, scale=float(cfg.get("scale", 1.0)),
                                       batch_size=batch_size)
    mu, sigma = _real_mu_sigma(real_stats)
    ref = ReferenceSet(_load_array(init_features, "initial reference features"), mu, sigma, **options)
    return DistributionReward(feature_net, ref, mode=mode, credit=credit, scale=float(cfg.get("scale", 1.0)),
                              batch_size=batch_size)


def class_sets(features: np.ndarray, labels, class_stats, **options) -> dict[int, ReferenceSet]:
    """One ReferenceSet per class: the initial rows of that class against that class's real statistics."""
    if class_stats is None or labels is None:
        raise ValueError("reward.per_class needs the real data's per-class statistics and the initial rows' labels "
                         "(an evaluator built with class labels, e.g. Evaluator.for_fmnist); or set per_class: false")
    lab = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).astype(np.int64)
    if lab.shape[0] != features.shape[0]:
        raise ValueError(f"{lab.shape[0]} labels for {features.shape[0]} initial reference rows")
    sets = {}
    for c in np.unique(lab).tolist():
        if class_stats.get(c) is None:
            raise ValueError(f"no real statistics for class {c}: the real data has none of its images")
        mu, sigma = _real_mu_sigma(class_stats[c])
        sets[c] = ReferenceSet(features[lab == c], mu, sigma, **options)
    return sets
