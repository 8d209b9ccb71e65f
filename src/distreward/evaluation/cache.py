"""The evaluation cache: the metrics of an evaluation, computed once and reused under the key of everything they
depend on.

    cache = EvalCache()                                         # <user cache folder>/evals
    m, grid = evaluate_generator(net, ev, plan, cache=cache)   # a miss: samples, scores, stores; a hit: reads back

The key (`generator_key`, or `eval_key` for another sampling protocol such as the merge trainer's) holds: the
cache format version, a digest of the source code that computes the numbers (`code_digest`: data, models,
sampling, features, metrics, evaluation), the torch and numpy versions, the device type, the generator's weights
(`network_hash`), its architecture and latent decoder (`decode_key`; None for pixel models), the sampling
protocol (for an `EvalPlan`: n, seed, batch size, noise scheme, classes, shape, the sampler spec with steps,
method, shift and cfg scale, and the evidence options such as bootstrap resamples; not `grid`), the evaluator
(`evaluator_key`: feature network weights, reference images or statistics, its settings) and the caller's
`extra` (e.g. an `ImageFigures` key). Any change of one of them is another key: a miss, computed and stored.
Not in the key: the thread count and the world size (they change the numbers at ~1e-6 at most: docs/runs.md).

Files: `<folder>/<digest>.json` (the key, the metrics, the seconds the evaluation took) and, when the caller
shows a sample grid, `<digest>.npz` (the first `grid` images, uint8); written atomically, the .npz first, so a
JSON always names a whole entry. An unreadable entry, or one whose stored key differs, is a miss (recomputed and
overwritten). Under torchrun only rank 0 reads and writes; every rank gets its verdict (`cached_evaluation`).
Nothing is cached for an evaluator that is not an `Evaluator` (its numbers depend on unknown state) or a network
without parameters or buffers (an analytic stand-in: nothing to hash).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..data import to_float_images, to_uint8_images
from ..utils import dist as D
from ..utils.cache import cache_root
from ..utils.io import atomic_save_json, atomic_write_bytes
from ..utils.progress import phase
from ..utils.configdiff import plain_config
from .evaluator import Evaluator, evaluator_key, network_hash

FORMAT_VERSION = 1
DEFAULT_EVAL_CACHE = "auto"      # <the user's cache folder>/evals, beside the evaluator's real-feature cache
CODE_PARTS = ("data", "models", "sampling", "features", "metrics", "evaluation")   # what computes the numbers


@dataclass(frozen=True)
class ImageFigures:
    """Figures a caller computes from all n evaluation images (one process): `fn(images) -> {name: JSON-able}`, merged
    into the metrics and cached with them; `key` (JSON-able): what fn's values depend on besides the images (e.g.
    the name of the figure and its classifier's weights hash)."""
    key: Any
    fn: Callable[[torch.Tensor], dict]


@dataclass
class CachedEval:
    """An entry read back: the metrics, the grid images (float in [-1, 1]; None without a grid), its files."""
    metrics: dict
    grid: torch.Tensor | None
    path: Path
    seconds: float | None


@lru_cache(maxsize=None)
def code_digest(*parts: str) -> str:
    """A digest of the package's source files under `parts` (sub-packages or .py files of distreward)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for part in parts:
        p = root / part
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def eval_key(net: torch.nn.Module, evaluator, sampling: dict, *, arch: str, decode_key: str | None = None,
             device="cpu", extra: Any = None, code: tuple[str, ...] = CODE_PARTS) -> dict | None:
    """The key of an evaluation of `net` with `evaluator` under a sampling protocol (`sampling`: JSON-able, every
    setting that decides the samples); None when nothing may be cached (see the module docstring)."""
    if not isinstance(evaluator, Evaluator) or not net.state_dict():
        return None
    return plain_config({"version": FORMAT_VERSION, "code": code_digest(*code), "torch": torch.__version__,
                         "numpy": np.__version__, "device": torch.device(device).type, "weights": network_hash(net),
                         "arch": str(arch), "decode": decode_key, "sampling": sampling,
                         "evaluator": evaluator_key(evaluator), "extra": extra})


def plan_sampling(plan) -> dict:
    """An `EvalPlan` as the key's sampling protocol: every field but `grid` (which images are shown, not what
    is scored), the sampler spec as its fields."""
    fields = asdict(plan)
    fields.pop("grid", None)
    return {"scheme": "eval-plan", **fields}


def generator_key(net, evaluator, plan, *, arch: str, decode: Callable | None, decode_key: str | None, device,
                  figures: ImageFigures | None = None, sampling: dict | None = None) -> dict | None:
    """The key of `evaluate_generator(net, evaluator, plan, ...)` (`sampling`: instead of the plan's own, e.g.
    several solvers). A custom `decode` needs its `decode_key` (the decoder's identity: e.g. the VAE's weights
    hash and convention)."""
    if decode is not None and decode_key is None:
        raise ValueError("a cached evaluation with a decoder needs decode_key= (the decoder's identity, e.g. the "
                         "VAE weights hash and latent convention); or pass cache=None")
    return eval_key(net, evaluator, plan_sampling(plan) if sampling is None else sampling, arch=arch,
                    decode_key=decode_key, device=device, extra={"figures": None if figures is None else figures.key})


# ----------------------------------------------------------------------------------------------------------
# JSON with int-keyed dicts and tuples (per-class FD, paired differences) kept as they are

def encode(obj: Any) -> Any:
    """A metrics value as JSON values that `decode` turns back into the same value."""
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {"__items__": [[encode(k), encode(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    return obj


def decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__items__"}:
            return {decode(k): decode(v) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(decode(v) for v in obj["__tuple__"])
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def shown(images: torch.Tensor) -> torch.Tensor:
    """Grid images as the cache holds them (uint8 and back): what a PNG of them shows, on a hit and a miss alike."""
    return to_float_images(to_uint8_images(images))


# ----------------------------------------------------------------------------------------------------------
# The store

class EvalCache:
    """A folder of evaluation results, one small JSON per key (plus a uint8 .npz of grid images)."""

    def __init__(self, folder=DEFAULT_EVAL_CACHE, verbose: bool = True):
        self.folder = cache_root() / "evals" if folder == DEFAULT_EVAL_CACHE else Path(folder)
        self.verbose = verbose
        self.hits = self.misses = 0

    def __repr__(self) -> str:
        return f"EvalCache({str(self.folder)!r})"

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha256(json.dumps(plain_config(key), sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: dict) -> Path:
        """The entry's JSON file (its grid: the same name with .npz)."""
        return self.folder / f"{self.digest(key)}.json"

    def load(self, key: dict, grid: int = 0) -> CachedEval | None:
        """The entry of `key` with at least `grid` grid images, else None (missing, damaged, another key)."""
        path = self.path(key)
        try:
            data = json.loads(path.read_text())
            if data.get("version") != FORMAT_VERSION or data.get("key") != plain_config(key):
                return None
            images = None
            if grid > 0:
                with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
                    u8 = z["images"]
                if u8.shape[0] < grid:
                    return None
                images = to_float_images(u8[:grid])
            return CachedEval(decode(data["metrics"]), images, path, data.get("seconds"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, key: dict, metrics: dict, grid: torch.Tensor | None = None, seconds: float | None = None) -> Path:
        """Write the entry of `key` (the grid first, then the JSON that names it)."""
        path = self.path(key)
        if grid is not None and grid.shape[0] > 0:
            buf = io.BytesIO()
            np.savez(buf, images=to_uint8_images(grid).numpy())
            atomic_write_bytes(path.with_suffix(".npz"), buf.getvalue())
        atomic_save_json(path, {"version": FORMAT_VERSION, "key": plain_config(key), "metrics": encode(metrics),
                                "grid": 0 if grid is None else int(grid.shape[0]),
                                "seconds": None if seconds is None else round(float(seconds), 3),
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return path


def default_eval_cache(evaluator) -> EvalCache | None:
    """The cache beside an evaluator's real-feature cache (`<cache_dir>/evals`, in the user's cache folder by default);
    None when the evaluator has no cache folder (e.g. cache_dir=None in tests)."""
    folder = getattr(evaluator, "cache_dir", None) if isinstance(evaluator, Evaluator) else None
    return None if folder is None else EvalCache(Path(folder) / "evals")


def eval_cache_for(setting, evaluator) -> EvalCache | None:
    """An evaluation-cache setting as a cache: "auto" (`default_eval_cache` of the evaluator), None (off), an
    `EvalCache`, or a folder."""
    if setting == "auto":
        return default_eval_cache(evaluator)
    return setting if setting is None or isinstance(setting, EvalCache) else EvalCache(setting)


def cached_evaluation(cache: EvalCache | None, key: dict | None,
                      compute: Callable[[], tuple[dict, torch.Tensor | None]], *, grid: int = 0,
                      desc: str = "evaluation") -> tuple[dict, torch.Tensor | None, bool]:
    """(metrics, grid images, hit) of `compute() -> (metrics, images)` through the cache: rank 0 reads the entry
    and every rank gets its verdict; on a miss every rank computes and rank 0 stores. Without a cache or a key
    (None on every rank alike): compute(), its images unchanged. With a cache the images are the first `grid`
    as the cache holds them (`shown`; rank 0's only: other ranks get None on a hit)."""
    if cache is None or key is None:
        metrics, images = compute()
        return metrics, images, False
    entry = cache.load(key, grid) if D.is_main() else None
    metrics = D.broadcast_object(None if entry is None else entry.metrics)
    if metrics is not None:
        cache.hits += 1
        if entry is not None and cache.verbose:
            took = f" (computed in {entry.seconds:.1f} s)" if entry.seconds is not None else ""
            phase(f"{desc}: cached evaluation {entry.path}{took}")
        return metrics, None if entry is None else entry.grid, True
    cache.misses += 1
    t0 = time.perf_counter()
    metrics, images = compute()
    images = None if images is None or grid <= 0 else shown(images[:grid])
    if D.is_main():
        cache.store(key, metrics, images, time.perf_counter() - t0)
    return metrics, images, False
