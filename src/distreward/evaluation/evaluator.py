"""Image-level evaluation against a reference set: FD on two feature networks, KID, precision and recall,
density and coverage.

    ev = Evaluator.for_fmnist()              # Fashion-MNIST train as the reference, both embedded networks
    ev.evaluate(images)                      # {'fd_reward', 'fd_eval', 'kid', 'kid_std', 'precision', 'recall',
                                             #  'density', 'coverage', 'n'}

`fd_reward` is the Frechet distance on the first network (the reward's own, `fmnist-reward`); `fd_eval` on the
second, held-out one (`fmnist-eval`), so a gain cannot be an artefact of the reward's features. KID (x1e3, the
customary scale; `kid_std` is the std over subsets), precision/recall (k=3) and density/coverage (k=5) are
computed on the held-out (last) network's features. Real statistics use every reference image; KID,
precision/recall and density/coverage use a seeded random subset of at most `max_real` of them (density/coverage
a further seeded subset of as many real rows as generated ones: the radii of its real k-NN balls shrink with the
number of real rows, so unequal sizes move both figures). Real features
are computed once and cached in `cache_dir` (default: the user's cache folder, `utils.cache.cache_root()`), in a
file keyed by the networks' weights and the reference images, so repeated runs are fast.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data import check_images, load_fmnist, pad_to
from ..features import compute_features, get_feature_network
from ..metrics import (GaussianStats, KIDReference, density_coverage, frechet_distance, knn_radii, precision_recall,
                       sqrtm_psd)
from ..metrics.evidence import class_stats_arrays, class_stats_from_arrays, labels_key, per_class_stats
from ..utils.cache import cache_root
from ..utils.errors import InputError
from ..utils.io import atomic_write_bytes
from ..utils.progress import phase

KID_SCALE = 1e3
DENSITY_COVERAGE_K = 5                    # the k of Naeem et al. 2020, independent of precision/recall's k
DEFAULT_CACHE = "auto"                    # the user's cache folder (utils.cache.cache_root())
_CACHE_VERSION = "1"


def _hash_tensors(tensors, h=None):
    h = h or hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h


def network_hash(net: torch.nn.Module) -> str:
    """A digest of the network's parameters and buffers (names, shapes, values): the cache key of its features."""
    sd = net.state_dict()
    h = hashlib.blake2b(digest_size=16)
    h.update(type(net).__name__.encode())
    for name in sorted(sd):
        h.update(name.encode())
        _hash_tensors([sd[name]], h)
    return h.hexdigest()


def images_hash(images: torch.Tensor) -> str:
    return _hash_tensors([images]).hexdigest()


def evaluator_key(evaluator) -> dict:
    """What an evaluator's numbers depend on (the cache key of results computed with it): for an `Evaluator`, its
    inputs (the networks' weights, labels, the reference images' hash, the given statistics' hashes, settings),
    not the real features computed from them (those may differ in the last bits with the thread count); for
    another object, its type."""
    if not isinstance(evaluator, Evaluator):
        return {"type": f"{type(evaluator).__module__}.{type(evaluator).__qualname__}"}
    return {"nets": [network_hash(n) for n in evaluator.nets], "labels": list(evaluator.labels),
            "reference_images": evaluator.ref_key, "reference_stats": dict(sorted(evaluator.ref_stats_key.items())),
            "k": evaluator.k, "max_real": evaluator.max_real, "seed": evaluator.seed,
            "kid": [evaluator.kid_subsets, evaluator.kid_subset_size]}


def _net_label(spec, net) -> str:
    return spec if isinstance(spec, str) else getattr(net, "feature_name", type(net).__name__)


# ------------------------------------------------------------------------------------------ perturbations

def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian weights on [-3 sigma, 3 sigma]."""
    r = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def perturb_images(images: torch.Tensor, kind: str, strength: float | None = None, seed: int = 0) -> torch.Tensor:
    """Degraded copies for sanity checks: `blur` (Gaussian, sigma = strength px, default 1.0) or `noise`
    (additive Gaussian of std = strength in the [-1, 1] range, default 0.2, then clipped)."""
    if kind == "blur":
        sigma = 1.0 if strength is None else float(strength)
        if sigma <= 0:
            raise ValueError(f"blur strength (sigma in pixels) must be > 0, got {sigma}")
        w = gaussian_kernel1d(sigma).to(images)
        r, c = w.numel() // 2, images.shape[1]
        x = torch.nn.functional.pad(images, (r, r, r, r), mode="replicate")
        x = torch.nn.functional.conv2d(x, w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return torch.nn.functional.conv2d(x, w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    if kind == "noise":
        std = 0.2 if strength is None else float(strength)
        g = torch.Generator().manual_seed(seed)
        return (images + std * torch.randn(images.shape, generator=g).to(images)).clamp(-1, 1)
    raise ValueError(f"unknown perturbation {kind!r}; use 'blur' or 'noise'")


def fit_images(images: torch.Tensor, input_shape: tuple[int, int, int] | None, name: str = "images") -> torch.Tensor:
    """Match images to a network's input: 28x28 Fashion-MNIST-sized images are padded to 32x32 (background -1);
    any other mismatch is an error that says what the network expects."""
    if input_shape is None or tuple(images.shape[1:]) == tuple(input_shape):
        return images
    c, h, w = input_shape
    if images.shape[1] == c and images.shape[-2] <= h and images.shape[-1] <= w and (h, w) == (32, 32):
        return pad_to(images, h)
    raise InputError(f"{name} have shape {tuple(images.shape[1:])} (C, H, W) but the feature network expects {tuple(input_shape)}; "
                     + ("convert them to grayscale" if images.shape[1] != c else f"resize them to {h}x{w}"))


def sample_rows(n: int, limit: int | None, seed: int = 0) -> np.ndarray | None:
    """Sorted seeded random indices of `limit` rows out of n (None: keep all)."""
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise ValueError(f"a row limit must be >= 1, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


# ------------------------------------------------------------------------------------------ evaluator

class Evaluator:
    """Reference features/statistics computed once; `evaluate(images)` returns the metrics of an image set.

    ref_images: float (N, C, H, W) in [-1, 1], or None with `ref_stats` (FD only: KID, precision/recall and
    density/coverage need real features). ref_stats: {network label: GaussianStats} for networks whose real
    statistics are given.
    feature_nets: registry names, .safetensors paths or modules (the first is the reward's, the last the held-out);
    labels: their names in results (default: the names given, or the module's `feature_name`).
    ref_labels: the reference images' class labels (optional): then `real_class_stats[i]` holds each class's real
    statistics on network i (for per-class FD), cached with the features.
    """

    def __init__(self, ref_images: torch.Tensor | None = None, *, feature_nets: Sequence = ("fmnist-reward", "fmnist-eval"),
                 device: str | torch.device = "cpu", k: int = 3, max_real: int = 10000,
                 cache_dir: str | os.PathLike | None = DEFAULT_CACHE, ref_stats: dict[str, GaussianStats] | None = None,
                 batch_size: int = 500, progress: bool = False, seed: int = 0,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, labels: Sequence[str] | None = None,
                 ref_labels=None):
        if not feature_nets:
            raise ValueError("feature_nets is empty: give at least one feature network")
        if ref_images is None and not ref_stats:
            raise ValueError("give reference images (ref_images) or reference statistics (ref_stats)")
        self.device, self.k, self.max_real, self.seed = device, int(k), int(max_real), int(seed)
        self.batch_size, self.progress = batch_size, progress
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.cache_dir = cache_root() if cache_dir == DEFAULT_CACHE else None if cache_dir is None else Path(cache_dir)
        self.split: str | None = None             # "train" / "test" for the Fashion-MNIST evaluators
        self.nets, self.labels = [], []
        for spec in feature_nets:
            net = spec if isinstance(spec, torch.nn.Module) else get_feature_network(spec, device=device)
            self.nets.append(net.eval().requires_grad_(False))
            self.labels.append(_net_label(spec, net))
        if labels is not None:
            if len(labels) != len(self.nets):
                raise ValueError(f"{len(labels)} labels for {len(self.nets)} feature networks")
            self.labels = [str(x) for x in labels]
        self.real_stats: list[GaussianStats | None] = [None] * len(self.nets)
        self.real_feats: list[np.ndarray | None] = [None] * len(self.nets)
        self.ref_key: str | None = None           # the reference images' hash (see evaluator_key)
        self.ref_stats_key: dict[str, str] = {}   # the given statistics' hashes
        self.real_class_stats: list[dict[int, GaussianStats] | None] = [None] * len(self.nets)  # with ref_labels
        if ref_images is not None:
            ref_images = check_images(ref_images, name="reference images")
            if ref_images.shape[0] < 2:
                raise ValueError(f"need at least 2 reference images, got {ref_images.shape[0]}")
            img_key = self.ref_key = images_hash(ref_images)
            if ref_labels is not None and len(ref_labels) != ref_images.shape[0]:
                raise ValueError(f"{len(ref_labels)} reference labels for {ref_images.shape[0]} reference images")
            for i, net in enumerate(self.nets):
                self.real_stats[i], self.real_feats[i], self.real_class_stats[i] = self._real_features(
                    net, self.labels[i], ref_images, img_key, ref_labels)
        for label, st in (ref_stats or {}).items():
            if label not in self.labels:
                raise ValueError(f"reference statistics given for {label!r}, which is not one of the feature networks {self.labels}")
            i = self.labels.index(label)
            if st.dim != self.nets[i].dim:
                raise ValueError(f"reference statistics for {label!r} have dimension {st.dim} but the network gives "
                                 f"{self.nets[i].dim}-d features; were they made with another feature network?")
            self.real_stats[i] = st
            arrays = [torch.from_numpy(np.ascontiguousarray(a)) for a in (st.mu, st.sigma)]
            self.ref_stats_key[label] = _hash_tensors(arrays).hexdigest()
        self.real_sigma_half = [sqrtm_psd(st.sigma) if st is not None else None for st in self.real_stats]
        self._kid_reference: KIDReference | None = None     # see kid_reference / real_radii
        self._real_radii: dict[tuple[int, int | None], np.ndarray] = {}

    @classmethod
    def for_fmnist(cls, device: str | torch.device = "cpu", split: str = "train", max_real: int = 10000,
                   per_class: bool = True, **kwargs) -> "Evaluator":
        """Fashion-MNIST `split` as the reference, with the two embedded feature networks (and, with per_class,
        the real statistics of each class, from the dataset's labels)."""
        images, labels = load_fmnist(split)
        ev = cls(images, device=device, max_real=max_real, ref_labels=labels if per_class else None, **kwargs)
        ev.split = split
        return ev

    def network(self, name: str) -> tuple[torch.nn.Module | None, GaussianStats | None, np.ndarray | None]:
        """The feature network of that label and its real side (statistics, features), or Nones if it has none."""
        if name not in self.labels:
            return None, None, None
        i = self.labels.index(name)
        return self.nets[i], self.real_stats[i], self.real_feats[i]

    @property
    def has_real_features(self) -> bool:
        return self.real_feats[-1] is not None

    # ---- reference side

    def _cache_file(self, net, img_key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.blake2b(f"{_CACHE_VERSION}|{network_hash(net)}|{img_key}|{self.max_real}|{self.seed}".encode(),
                              digest_size=12).hexdigest()
        return self.cache_dir / f"real-features-{key}.npz"

    def _real_features(self, net, label: str, images: torch.Tensor, img_key: str, ref_labels=None):
        path = self._cache_file(net, img_key)
        lab_key = None if ref_labels is None else labels_key(ref_labels)
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    st = GaussianStats(int(z["s1"].size))
                    st.n, st.s1, st.s2 = int(z["n"]), z["s1"].copy(), z["s2"].copy()
                    classes = None if lab_key is None else class_stats_from_arrays(z, lab_key)
                    return st, z["feats"].copy(), classes
            except (OSError, KeyError, ValueError):  # also: no per-class sums for these labels in the file
                pass  # an unreadable cache entry is recomputed and overwritten
        where = f"; cached in {path.parent}" if path is not None else ""
        phase(f"evaluator: features of the {images.shape[0]} reference images on {label} (once{where})")
        feats = compute_features(net, images, batch_size=self.batch_size, progress=self.progress, desc=f"real features ({label})")
        st = GaussianStats.from_features(feats)
        classes = None if lab_key is None else per_class_stats(feats, ref_labels)
        keep = sample_rows(feats.shape[0], self.max_real, self.seed)
        if keep is not None:
            feats = feats[keep]
        if path is not None:
            buf = io.BytesIO()
            extra = {} if classes is None else class_stats_arrays(classes, lab_key)
            np.savez(buf, s1=st.s1, s2=st.s2, n=np.int64(st.n), feats=feats, **extra)
            atomic_write_bytes(path, buf.getvalue())
        return st, feats, classes

    # ---- generated side

    def features(self, images: torch.Tensor) -> list[np.ndarray]:
        """Features of `images` on every network (float64 (N, d) each)."""
        images = check_images(images, name="images to evaluate")
        if images.shape[0] == 0:
            raise ValueError("no images to evaluate")
        return [compute_features(net, images, batch_size=self.batch_size, progress=self.progress, desc=f"features ({label})")
                for net, label in zip(self.nets, self.labels)]

    def evaluate(self, images: torch.Tensor) -> dict:
        """Metrics of an image set (float (N, C, H, W) in [-1, 1]); see the module docstring for the keys."""
        return self.evaluate_features(self.features(images))

    def frechet_distances(self, feats: Sequence[np.ndarray]) -> dict[str, float | None]:
        """{network label: FD of the features against its real statistics} (None where it has none)."""
        if len(feats) != len(self.nets):
            raise ValueError(f"expected features for {len(self.nets)} networks, got {len(feats)}")
        n = int(feats[0].shape[0])
        fds = {}
        for label, f, st, half in zip(self.labels, feats, self.real_stats, self.real_sigma_half):
            if st is None:
                fds[label] = None
                continue
            if f.shape[1] != st.dim:
                raise ValueError(f"{label}: features of dimension {f.shape[1]}, reference statistics {st.dim}")
            if n < 2:
                raise ValueError(f"need at least 2 images for a covariance, got {n}")
            g = GaussianStats.from_features(f)
            fds[label] = frechet_distance(g.mu, g.sigma, st.mu, st.sigma, sigma2_half=half)
        return fds

    def evaluate_features(self, feats: Sequence[np.ndarray]) -> dict:
        """The same metrics from precomputed features, one (N, d) array per network, in order."""
        fds = self.frechet_distances(feats)
        n = int(feats[0].shape[0])
        values = list(fds.values())
        out = {"fd_reward": values[0], "fd_eval": values[1] if len(values) > 1 else None}
        out["fd"] = fds
        out.update({"kid": None, "kid_std": None, "precision": None, "recall": None, "density": None, "coverage": None,
                    "n": n})
        real = self.real_feats[-1]
        if real is not None:
            fake = feats[-1]
            mean, std = self.kid_reference()(fake)
            out["kid"], out["kid_std"] = mean * KID_SCALE, std * KID_SCALE
            if n > self.k and real.shape[0] > self.k:
                out.update(precision_recall(real, fake, k=self.k, real_radii=self.real_radii(self.k)))
            real_dc = self.real_rows(n)     # as many real rows as fake ones (Naeem et al.)
            if real_dc.shape[0] > DENSITY_COVERAGE_K:
                out.update(density_coverage(real_dc, fake, k=DENSITY_COVERAGE_K,
                                            real_radii=self.real_radii(DENSITY_COVERAGE_K, n)))
        return out

    # ---- the real side of KID and the k-NN metrics, computed once per evaluator and kept between generated sets

    def kid_reference(self) -> KIDReference:
        """The held-out network's KID reference: its real subsets and their kernel terms."""
        if self._kid_reference is None:
            self._kid_reference = KIDReference(self.real_feats[-1], self.kid_subsets, self.kid_subset_size, self.seed)
        return self._kid_reference

    def real_rows(self, n: int | None = None) -> np.ndarray:
        """The held-out network's real features, or the seeded subset of `n` of them (all when n >= their count)."""
        real = self.real_feats[-1]
        rows = None if n is None else sample_rows(real.shape[0], n, self.seed)
        return real if rows is None else real[rows]

    def real_radii(self, k: int, n: int | None = None) -> np.ndarray:
        """The k-NN radii of `real_rows(n)`."""
        if (k, n) not in self._real_radii:
            self._real_radii[k, n] = knn_radii(self.real_rows(n), k)
        return self._real_radii[k, n]


def format_metrics(m: dict) -> str:
    """One readable line per metric; metrics that could not be computed say why."""
    def f(v, fmt=".4f"):
        return "n/a" if v is None else format(v, fmt)

    lines = [f"images             {m['n']}"]
    for label, v in m.get("fd", {}).items():
        lines.append(f"FD {label:<15} {f(v)}" + ("" if v is not None else "  (no reference statistics for this network)"))
    why = "" if m["kid"] is not None else "  (needs reference images or features, not only statistics)"
    why_pr = why or ("" if m["precision"] is not None else "  (needs more images than k)")
    why_dc = why or ("" if m.get("density") is not None
                     else f"  (needs more than {DENSITY_COVERAGE_K} reference features)")
    lines.append(f"KID x1e3           {f(m['kid'])} +- {f(m['kid_std'])}{why}")
    lines.append(f"precision          {f(m['precision'])}{why_pr}")
    lines.append(f"recall             {f(m['recall'])}{why_pr}")
    lines.append(f"density            {f(m.get('density'))}{why_dc}")
    lines.append(f"coverage           {f(m.get('coverage'))}{why_dc}")
    return "\n".join(lines)
