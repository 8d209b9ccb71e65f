"""Evaluating a generator: draw the plan's n class-balanced samples, batch by batch, and score them.

Under torchrun each rank samples a contiguous block of the batches and keeps only features (never all images);
FD comes from the merged float64 sums, KID, precision/recall and density/coverage (where the evaluator has real
features) from the gathered features. One process is the world-size-1 case of the same loop.

The evidence a comparison needs (docs/metrics.md): FD standard errors (`plan.uncertainty` bootstrap resamples),
FD-infinity (`plan.fd_infinity`), per-class FD (`plan.per_class`), several solvers on the same noise and labels
(`evaluate_solvers`, `nfe`, `heun_for_nfe`) and the step count at which a solver has converged (`converged_steps`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import numpy as np
import torch

from ..features import compute_features
from ..metrics import GaussianStats, evidence, frechet_distance, merge_gaussian_stats
from ..sampling.generate import SamplerSpec, balanced_labels, eval_batch, eval_batch_generator, seeded_noise
from ..utils import dist as D
from ..utils.progress import progress as tqdm
from .cache import EvalCache, ImageFigures, cached_evaluation, generator_key, plan_sampling


@dataclass(frozen=True)
class EvalPlan:
    """What an evaluation draws: n class-balanced samples from `seed` with `sampler`, in batches of batch_size.

    noise `seed`: the n starting points are one draw from the seed (the embedded default's protocol; one process);
    `batch`: batch b draws from its own stream (seed, b), so any number of processes draw the same samples and no
    process ever holds all n starting points. `grid`: how many images the caller gets back for a sample grid
    (`keep_images` returns all of them, one process only).
    Evidence (all off by default: the metrics and their cost are then unchanged): `uncertainty` bootstrap
    resamples for FD standard errors (0 = off; the resamples are drawn from `seed`, so every model and solver
    evaluated with the plan gets the same ones), `fd_infinity` (FD extrapolated to N = infinity), `per_class`
    (per-class FD against the evaluator's per-class real statistics).
    """
    n: int
    seed: int
    batch_size: int = 500
    grid: int = 64
    num_classes: int = 10
    image_shape: tuple = (1, 32, 32)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    noise: str = "batch"
    uncertainty: int = 0
    fd_infinity: bool = False
    per_class: bool = False

    def __post_init__(self):
        if self.noise not in ("seed", "batch"):
            raise ValueError(f"evaluation noise must be 'seed' or 'batch', got {self.noise!r}")
        if self.n < 2 or self.batch_size < 1:
            raise ValueError(f"an evaluation needs eval.n >= 2 and eval.batch_size >= 1, got {self.n} and {self.batch_size}")
        if self.uncertainty != 0 and self.uncertainty < 2:
            raise ValueError(f"eval.uncertainty is a number of bootstrap resamples: 0 (off) or >= 2, got {self.uncertainty}")
        if self.per_class and self.num_classes <= 0:
            raise ValueError("eval.per_class needs a class-conditional model (model.num_classes > 0)")

    @property
    def wants_features(self) -> bool:
        """Whether the evaluation keeps the generated features (for the evidence options)."""
        return bool(self.uncertainty or self.fd_infinity or self.per_class)


def evaluator_network(evaluator, name: str):
    """(feature network, real statistics, real features) of the evaluator's network `name`; Nones when it has none."""
    lookup = getattr(evaluator, "network", None)
    return lookup(name) if callable(lookup) else (None, None, None)


def fd_from_stats(evaluator, stats: list) -> dict:
    """The evaluator's FD metrics from generated-side statistics (one GaussianStats per feature network)."""
    fds = {}
    for label, g, st, half in zip(evaluator.labels, stats, evaluator.real_stats, evaluator.real_sigma_half):
        fds[label] = None if st is None or g.n < 2 else frechet_distance(g.mu, g.sigma, st.mu, st.sigma, sigma2_half=half)
    values = list(fds.values())
    return {"fd_reward": values[0], "fd_eval": values[1] if len(values) > 1 else None, "fd": fds, "kid": None,
            "kid_std": None, "precision": None, "recall": None, "density": None, "coverage": None,
            "n": int(stats[0].n)}


def sharded_metrics(evaluator, batches: Iterable[torch.Tensor], empty_shape) -> dict:
    """The evaluator's metrics of every rank's image batches together (`batches`: this rank's image tensors).

    A stand-in evaluator without networks scores the gathered images (`empty_shape`: the trailing shape a rank
    without batches sends)."""
    return sharded_evaluation(evaluator, batches, empty_shape)[0]


def sharded_evaluation(evaluator, batches: Iterable[torch.Tensor], empty_shape,
                       keep_features: bool = False) -> tuple[dict, list[np.ndarray] | None]:
    """`sharded_metrics` and, with keep_features, every rank's features gathered (one (n, d) array per network,
    rows in sample order; None for a stand-in evaluator without networks)."""
    nets = getattr(evaluator, "nets", None)
    if nets is None:
        if keep_features:
            raise ValueError("the evidence options (eval.uncertainty, fd_infinity, per_class) need an Evaluator with "
                             "feature networks")
        local = list(batches)
        return dict(evaluator.evaluate(D.all_gather_rows(torch.cat(local) if local else torch.zeros((0, *empty_shape))))), None
    stats = [GaussianStats(int(f.dim)) for f in nets]
    keep = evaluator.has_real_features or keep_features
    feats: list[list] = [[] for _ in nets]
    for images in batches:
        for i, fnet in enumerate(nets):
            f = compute_features(fnet, images, batch_size=getattr(evaluator, "batch_size", 500))
            stats[i].update(f)
            if keep:
                feats[i].append(f)
    gathered = None
    if keep:
        gathered = [D.all_gather_rows(np.concatenate(f) if f else np.zeros((0, st.dim))) for f, st in zip(feats, stats)]
    if evaluator.has_real_features:
        return evaluator.evaluate_features(gathered), gathered
    return fd_from_stats(evaluator, [merge_gaussian_stats(st) for st in stats]), gathered


def plain_metrics(metrics: dict) -> dict:
    """numpy scalars -> Python floats (JSON-ready); nested values unchanged."""
    return {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------
# Evidence: FD standard errors, FD-infinity, per-class FD (metric math in distreward.metrics.evidence)

def net_keys(evaluator) -> list[str]:
    """The flat metric prefix of each feature network: fd_reward, fd_eval for the first two, else fd_<label>."""
    return [("fd_reward", "fd_eval")[i] if i < 2 else f"fd_{label}" for i, label in enumerate(evaluator.labels)]


def evidence_metrics(evaluator, feats: list[np.ndarray], labels: torch.Tensor | None, *, uncertainty: int = 0,
                     fd_infinity: bool = False, per_class: bool = False, seed: int = 0) -> dict:
    """The evidence keys for generated features (one (n, d) array per network; `labels`: their class labels).

    uncertainty > 0: `fd_err` {label: one bootstrap standard error} and `fd_reward_err`, `fd_eval_err`, with the
    replicates behind them, `fd_reward_boot`, `fd_eval_boot` (lists: the FD of each resample; every evaluation with
    the same n, uncertainty and seed resamples the same rows, so two rows of one plan pair replicate by replicate,
    `protocol.paired_difference`);
    fd_infinity: `fd_inf` and `fd_reward_inf`, `fd_eval_inf`; per_class: `fd_class` {label: {'fd': {class:
    FD}, 'mean', 'worst', 'worst_class'}} and `fd_reward_class_mean`, `fd_reward_class_worst` (same for fd_eval).
    Networks without real statistics give None."""
    out: dict = {}
    sides = list(zip(evaluator.labels, net_keys(evaluator), feats, evaluator.real_stats, evaluator.real_sigma_half))

    def each(name: str, fn):
        vals = {label: (None if st is None else fn(f, st, half)) for label, _, f, st, half in sides}
        out[name] = vals
        return vals

    if uncertainty:
        reps = {label: (None if st is None else evidence.bootstrap_fds(f, st, uncertainty, seed, sigma_half=half))
                for label, _, f, st, half in sides}
        out["fd_err"] = {label: (None if r is None else float(r.std(ddof=1))) for label, r in reps.items()}
        for label, key, *_ in sides:
            out[f"{key}_err"] = out["fd_err"][label]
            out[f"{key}_boot"] = None if reps[label] is None else reps[label].tolist()
    if fd_infinity:
        infs = each("fd_inf", lambda f, st, half: evidence.fd_infinity(f, st, seed=seed, sigma_half=half))
        out.update({f"{key}_inf": infs[label] for label, key, *_ in sides})
    if per_class:
        classes = getattr(evaluator, "real_class_stats", None) or [None] * len(sides)
        if labels is None or all(c is None for c in classes):
            raise ValueError("per-class FD needs class labels and an evaluator with per-class real statistics: "
                             "Evaluator(images, ref_labels=labels) or Evaluator.for_fmnist()")
        out["fd_class"] = {label: (None if cl is None else evidence.per_class_fd(f, labels, cl))
                           for (label, _, f, _, _), cl in zip(sides, classes)}
        for label, key, *_ in sides:
            pc = out["fd_class"][label]
            out[f"{key}_class_mean"] = None if pc is None else pc["mean"]
            out[f"{key}_class_worst"] = None if pc is None else pc["worst"]
    return out


def score_generator(net, evaluator, plan: EvalPlan, *, arch: str = "unet", decode: Callable | None = None,
                    device="cpu", keep_images: bool = False, keep_features: bool = False, progress: bool = False,
                    desc: str = "eval") -> tuple[dict, torch.Tensor, list[np.ndarray] | None]:
    """`evaluate_generator` and, with keep_features (or any evidence option of the plan), the generated features
    (one (n, d) array per network, in sample order: row i comes from the plan's noise i and label i)."""
    n, bs, shape = plan.n, plan.batch_size, tuple(plan.image_shape)
    if plan.noise == "seed" and D.world_size() > 1:
        raise ValueError("evaluation noise 'seed' draws all n starting points in one process; use 'batch' under torchrun")
    decode = decode or (lambda x: x.clamp(-1, 1))
    labels_all = balanced_labels(n, plan.num_classes)
    noise_all = seeded_noise(n, shape, plan.seed) if plan.noise == "seed" else None
    shown, limit = [], (n if keep_images else plan.grid)

    def batches():
        for b in tqdm(D.shard_indices((n + bs - 1) // bs), desc=desc, disable=not progress, unit="batch", leave=False):
            lo, hi = b * bs, min(n, (b + 1) * bs)
            g = eval_batch_generator(plan.seed, b)
            noise = noise_all[lo:hi] if noise_all is not None else torch.randn((hi - lo, *shape), generator=g)
            images = eval_batch(net, labels_all[lo:hi], noise, plan.sampler, arch=arch, generator=g, decode=decode,
                                device=device).cpu()
            if sum(x.shape[0] for x in shown) < limit:
                shown.append(images[:limit])
            yield images

    metrics, feats = sharded_evaluation(evaluator, batches(), shape, keep_features or plan.wants_features)
    metrics = plain_metrics(metrics)
    if plan.wants_features:
        metrics.update(evidence_metrics(evaluator, feats, labels_all, uncertainty=plan.uncertainty,
                                        fd_infinity=plan.fd_infinity, per_class=plan.per_class, seed=plan.seed))
    return metrics, (torch.cat(shown)[:limit] if shown else torch.zeros((0, *shape))), feats


def evaluate_generator(net, evaluator, plan: EvalPlan, *, arch: str = "unet", decode: Callable | None = None,
                       device="cpu", keep_images: bool = False, progress: bool = False, desc: str = "eval",
                       cache: EvalCache | None = None, decode_key: str | None = None,
                       figures: ImageFigures | None = None) -> tuple[dict, torch.Tensor]:
    """Metrics of the plan's samples of `net` and the images shown: the first plan.grid of rank 0, or all n with
    keep_images (one process). The plan's evidence options add their keys (see `evidence_metrics`).

    `figures`: values the caller computes from all n images (one process; e.g. a classifier's log-prob), merged
    into the metrics. `cache` (an `EvalCache`): a hit returns the stored metrics and grid without sampling; a miss
    computes, stores and returns them; the grid is then the plan.grid images as the cache holds them (uint8 and
    back), on a hit and a miss alike, so keep_images is refused. `decode_key`: the identity of `decode` (a latent
    decoder), needed with a cache (evaluation/cache.py: the key)."""
    if cache is not None and keep_images:
        raise ValueError("a cached evaluation returns the plan.grid images only: pass keep_images=False, and "
                         "compute figures of all n images through figures=")
    if figures is not None and D.world_size() > 1:
        raise ValueError("figures= are computed from all n images in one process; not under torchrun")

    def compute():
        metrics, images, _ = score_generator(net, evaluator, plan, arch=arch, decode=decode, device=device,
                                             keep_images=keep_images or figures is not None, progress=progress,
                                             desc=desc)
        if figures is not None:
            metrics = {**metrics, **figures.fn(images)}
            images = images if keep_images else images[:plan.grid]
        return metrics, images

    key = None if cache is None else generator_key(net, evaluator, plan, arch=arch, decode=decode,
                                                   decode_key=decode_key, device=device, figures=figures)
    metrics, images, _ = cached_evaluation(cache, key, compute, grid=plan.grid, desc=desc)
    return metrics, (images if images is not None else torch.zeros((0, *plan.image_shape)))


# ----------------------------------------------------------------------------------------------------------
# Several solvers on the same noise and labels

def nfe(spec: SamplerSpec) -> int:
    """Network function evaluations of one sample: Euler T, Heun 2T - 1 (no correction on the step to sigma = 0),
    SiT's SDE T. Classifier-free guidance runs both branches in one batched call, counted once."""
    if spec.kind == "sit-sde" or spec.method == "euler":
        return int(spec.steps)
    if spec.method == "heun":
        return 2 * int(spec.steps) - 1
    raise ValueError(f"unknown ODE method {spec.method!r}; choose 'euler' or 'heun'")


def heun_for_nfe(budget: int, base: SamplerSpec | None = None) -> SamplerSpec:
    """The Heun ODE sampler (training-free) at a cost of at most `budget` network calls: T = (budget + 1) // 2
    steps (2T - 1 calls: exactly `budget` when it is odd). Other settings (shift, cfg) from `base`."""
    if int(budget) < 1:
        raise ValueError(f"a sampler needs at least 1 network call, got an NFE budget of {budget}")
    return replace(base or SamplerSpec(), kind="ode", method="heun", steps=(int(budget) + 1) // 2)


def evaluate_solvers(net, evaluator, plan: EvalPlan, solvers: dict[str, SamplerSpec], *, arch: str = "unet",
                     decode: Callable | None = None, device="cpu", progress: bool = False,
                     reference: str | None = None, cache: EvalCache | None = None,
                     decode_key: str | None = None) -> dict[str, dict]:
    """{name: metrics} of the same model with each solver, on the SAME noise and labels (the plan's seed), so the
    solvers' numbers are paired. Each metrics dict gains `nfe`. With `reference` (a solver's name), the others
    gain `fd_diff` {label: (FD - FD_reference, its paired bootstrap standard error)} and `fd_reward_diff`,
    `fd_reward_diff_err` (same for fd_eval), from plan.uncertainty (else 50) resamples shared by both sides.
    `cache`: each solver's metrics are one entry (as `evaluate_generator`'s); with a reference, the whole result
    is one entry keyed by every solver (the paired errors need all solvers' features)."""
    if not solvers:
        raise ValueError("evaluate_solvers needs at least one solver")
    if reference is not None and reference not in solvers:
        raise ValueError(f"reference solver {reference!r} is not one of {sorted(solvers)}")
    if reference is None:
        return {name: dict(evaluate_generator(net, evaluator, replace(plan, sampler=spec), arch=arch, decode=decode,
                                              device=device, progress=progress, desc=f"eval {name}", cache=cache,
                                              decode_key=decode_key)[0], nfe=nfe(spec))
                for name, spec in solvers.items()}

    def paired():
        out, feats = {}, {}
        for name, spec in solvers.items():
            metrics, _, f = score_generator(net, evaluator, replace(plan, sampler=spec), arch=arch, decode=decode,
                                            device=device, keep_features=True, progress=progress, desc=f"eval {name}")
            out[name], feats[name] = dict(metrics, nfe=nfe(spec)), f
        n_boot = plan.uncertainty or evidence.DEFAULT_RESAMPLES
        for name in solvers:
            diffs = {label: (None if st is None else evidence.paired_difference(fa, fr, st, n_boot, plan.seed, sigma_half=half))
                     for label, fa, fr, st, half in zip(evaluator.labels, feats[name], feats[reference],
                                                        evaluator.real_stats, evaluator.real_sigma_half)}
            out[name]["fd_diff"] = diffs
            for label, key in zip(evaluator.labels, net_keys(evaluator)):
                d = diffs[label]
                out[name][f"{key}_diff"], out[name][f"{key}_diff_err"] = (None, None) if d is None else d
        return out, None

    sampling = {**plan_sampling(plan), "sampler": None, "solvers": {n: asdict(s) for n, s in solvers.items()},
                "reference": reference}
    key = None if cache is None else generator_key(net, evaluator, plan, arch=arch, decode=decode,
                                                   decode_key=decode_key, device=device, sampling=sampling)
    return cached_evaluation(cache, key, paired, desc="eval solvers")[0]


def converged_steps(net, evaluator, plan: EvalPlan, method: str = "heun", start: int = 8, max_steps: int = 128,
                    tol: float | None = None, *, arch: str = "unet", decode: Callable | None = None, device="cpu",
                    progress: bool = False, cache: EvalCache | None = None,
                    decode_key: str | None = None) -> tuple[int | None, list[dict]]:
    """The ODE step count T from which doubling no longer changes FD: T = start, 2 start, ... <= max_steps on the
    plan's noise and labels, until |FD(2T) - FD(T)| <= tol on every network with real statistics; tol None: FD(2T)'s
    own bootstrap standard error (plan.uncertainty, else 50 resamples). Returns (T, or None if max_steps came
    first, and the trace: one row per step count with steps, nfe, fd_reward, fd_eval, fd_reward_err,
    fd_eval_err, fd_reward_change, fd_eval_change (|FD - FD of the previous row|; None on the first row) and
    converged). `cache`: every step count's evaluation is an entry (`evaluate_generator`)."""
    if int(start) < 1 or int(max_steps) < 2 * int(start):
        raise ValueError(f"converged_steps needs 1 <= start and 2 start <= max_steps, got start={start}, max_steps={max_steps}")
    run_plan = replace(plan, uncertainty=plan.uncertainty or evidence.DEFAULT_RESAMPLES) if tol is None else plan
    trace: list[dict] = []
    prev, steps = None, int(start)
    while steps <= max_steps:
        spec = replace(plan.sampler, kind="ode", method=method, steps=steps)
        m, _ = evaluate_generator(net, evaluator, replace(run_plan, sampler=spec), arch=arch, decode=decode,
                                  device=device, progress=progress, desc=f"eval {method} {steps}", cache=cache,
                                  decode_key=decode_key)
        row = {"steps": steps, "nfe": nfe(spec)}
        ok = []
        for label, key in zip(evaluator.labels, net_keys(evaluator)):
            fd, err = m["fd"][label], (m.get("fd_err") or {}).get(label)
            change = None if prev is None or fd is None else abs(fd - prev["fd"][label])
            row.update({key: fd, f"{key}_err": err, f"{key}_change": change})
            if change is not None:
                ok.append(change <= (err if tol is None else float(tol)))
        row["converged"] = bool(ok) and all(ok)
        trace.append(row)
        if row["converged"]:
            return steps // 2, trace
        prev, steps = m, steps * 2
    return None, trace
