"""The merge run's held-out evaluations and its baselines: theta(w) evaluated on the fixed evaluation seed (through
the evaluation cache, keyed by the merged weights), the baseline coefficient vectors (last, uniform, the post-hoc
EMA grid, each input alone, the greedy soup), their cached metrics (baselines.json) and the initial mean chosen
from them (merge.init)."""

from __future__ import annotations

import json

import numpy as np

from ..evaluation import EvalCache, cached_evaluation, eval_key
from ..evaluation.cache import CODE_PARTS
from ..evaluation.evaluator import evaluator_key
from ..evaluation.generator import plain_metrics, sharded_metrics
from ..utils import dist as D
from ..utils.cache import cache_valid, save_cache_key
from ..utils.configdiff import plain_config
from ..utils.hashing import hash_inputs
from ..utils.io import RunDir, atomic_save_json
from ..utils.progress import phase, progress as tqdm
from .candidates import CandidateSampler
from .inputs import has_phema, phema_weights
from .soup import greedy_soup, soup_weights
from .streaming import CheckpointSet


def evaluate_weights(sampler: CandidateSampler, w, evaluator, cfg, cache: EvalCache | None = None) -> dict:
    """Held-out metrics of theta(w): cfg.eval.n ODE samples from the fixed evaluation seed (split over the ranks
    under torchrun in sampler batches, merged by `evaluation.generator.sharded_metrics`). `cache`: through the
    evaluation cache, keyed by the merged weights (`merge_eval_key`; nothing is cached with a sampler of the
    caller's, `sampler.sample_key` None)."""
    w = np.asarray(w, np.float64)
    noise, labels = sampler.noise(int(cfg.eval.n), int(cfg.eval.seed))

    def compute():
        if D.world_size() == 1:
            return evaluator.evaluate(sampler.images(w, noise, labels)), None
        batches = (images for _, images in sampler.local_images([w], noise, labels))
        return sharded_metrics(evaluator, batches, tuple(cfg.model.image_shape)), None

    key = None
    if cache is not None and sampler.sample_key is not None:
        sampler.ckpts.merge_into(sampler.net, w)          # the weights evaluated: hashed into the key
        key = merge_eval_key(sampler, evaluator, cfg)
    return plain_metrics(cached_evaluation(cache, key, compute, desc="merge evaluation")[0])


def merge_eval_key(sampler: CandidateSampler, evaluator, cfg) -> dict | None:
    """The evaluation cache key of `evaluate_weights` with the live network's (merged) weights: the merge's own
    sampling protocol (cfg.eval n and seed, shared seeded noise and balanced labels, the sampler settings that
    built sampler.sample_fn) and the code of the merge's sampler besides the evaluation's."""
    sampling = {"scheme": "merge-shared-noise", "n": int(cfg.eval.n), "seed": int(cfg.eval.seed),
                "num_classes": int(cfg.model.num_classes), "image_shape": list(cfg.model.image_shape),
                "sampler": sampler.sample_key}
    return eval_key(sampler.net, evaluator, sampling, arch=str(sampler.ckpts.arch), device=sampler.device,
                    code=CODE_PARTS + ("merge/inputs.py", "merge/candidates.py"))


def baseline_weights(ckpts: CheckpointSet, cfg) -> dict[str, np.ndarray]:
    """last (one-hot on the last input), uniform (1/K), phema@<sigma_rel> for every EMA length of the grid, and
    one@<i> (each input alone) when baselines.greedy_soup asks for the inputs' own scores."""
    k = ckpts.k
    out = {"last": np.eye(k)[k - 1], "uniform": np.full(k, 1.0 / k)}
    if has_phema(ckpts):
        for s in cfg.baselines.ema_grid:
            out[f"phema@{float(s):g}"] = phema_weights(ckpts, float(s))
    if cfg.baselines.get("greedy_soup"):
        out.update({f"one@{i}": np.eye(k)[i] for i in range(k)})
    return out


# What picks the best post-hoc EMA length (the `phema` starting point and baseline): FD on the reward's features of
# the validation evaluation (eval.seed). The held-out network is never used to choose anything: it reports.
SELECT_BY = "fd_reward"


def best_baseline(results: dict[str, dict], prefix: str = "") -> str | None:
    """The baseline whose name starts with `prefix` ("phema@": the post-hoc EMA grid; "": every baseline, the
    inputs alone included) with the lowest SELECT_BY on the validation evaluation; None when none is scored."""
    scored = [k for k, r in results.items() if k.startswith(prefix) and r.get(SELECT_BY) is not None]
    return min(scored, key=lambda k: results[k][SELECT_BY]) if scored else None


def initial_mean(init, ckpts: CheckpointSet, baselines: dict[str, np.ndarray], results: dict[str, dict]) -> np.ndarray:
    """merge.init: phema (the best EMA length by SELECT_BY, uniform when no snapshot metadata), best (the best
    baseline by SELECT_BY), uniform, last, or a list."""
    if isinstance(init, str):
        if init == "phema":
            best = best_baseline(results, "phema@")
            return baselines[best].copy() if best else baselines["uniform"].copy()
        if init == "best":
            best = best_baseline(results)
            if best is None:
                raise ValueError(f"merge.init best: no baseline has {SELECT_BY}; use uniform, last or phema")
            return np.asarray(results[best]["w"], np.float64)
        if init in ("uniform", "last"):
            return baselines[init].copy()
        raise ValueError(f"merge.init must be phema, best, uniform, last or a list of {ckpts.k} numbers, got {init!r}")
    w = np.asarray(list(init), np.float64)
    if w.shape != (ckpts.k,):
        raise ValueError(f"merge.init has {w.size} coefficients for {ckpts.k} checkpoints")
    return w


def evaluate_baselines(probe: CandidateSampler, base_w: dict[str, np.ndarray], evaluator, cfg, run: RunDir, resume: bool,
                       progress: bool, eval_cache: EvalCache | None = None) -> dict[str, dict]:
    """Every baseline's metrics and weights, cached in baselines.json so that --resume does not redo them (reused
    only while its key, baselines.json.json, names the same inputs, evaluation, sampler and evaluator), and in
    `eval_cache` (across runs: keyed by the merged weights); the same dict on every rank."""
    main = D.is_main()
    bpath = run.path("baselines.json")
    key = baselines_key(probe.ckpts, evaluator, cfg) if main else None
    results: dict[str, dict] = json.loads(bpath.read_text()) if (resume and main and cache_valid(bpath, key)) else {}
    results = D.broadcast_object(results)
    todo = [name for name in base_w if name not in results]
    if main:
        phase(f"baselines: {len(todo)} to evaluate ({', '.join(todo) or 'all cached in ' + str(bpath)}), "
              f"{int(cfg.eval.n)} samples each")

    def metrics(w) -> dict:
        # phema at the snapshots' own EMA length is (numerically) the last snapshot: evaluate those weights once
        twin = next((k for k, r in results.items() if np.allclose(r["w"], w, rtol=0.0, atol=1e-6)), None)
        return ({k: v for k, v in results[twin].items() if k not in BASELINE_INFO} if twin
                else evaluate_weights(probe, w, evaluator, cfg, eval_cache))

    def store(name: str, entry: dict) -> None:
        results[name] = entry
        if main:
            atomic_save_json(bpath, results)
            save_cache_key(bpath, key)

    for name, w in tqdm(base_w.items(), desc="baselines", disable=not progress, leave=False):
        if name not in results:
            store(name, {**metrics(w), "w": w.tolist()})
    if cfg.baselines.get("greedy_soup") and "greedy_soup" not in results:
        results = D.broadcast_object(results)   # every rank orders the inputs by rank 0's scores
        store("greedy_soup", greedy_soup_baseline(probe.ckpts.k, results, metrics))
    return D.broadcast_object(results)   # the same initial mean on every rank, whatever the float rounding


# Keys of a baseline's entry besides its metrics.
BASELINE_INFO = ("w", "soup", "trials")


def greedy_soup_baseline(k: int, results: dict[str, dict], metrics) -> dict:
    """The greedy soup (`merge.soup`) of the K inputs by SELECT_BY: their one@<i> results first, then one evaluation
    (`metrics(w)`, rank 0's numbers on every rank) per input tried; its entry: metrics, w, soup, trials."""
    seen = {(i,): results[f"one@{i}"] for i in range(k)}

    def score(inputs: list[int]) -> float:
        seen[tuple(inputs)] = D.broadcast_object(metrics(soup_weights(inputs, k)))
        return seen[tuple(inputs)][SELECT_BY]

    soup = greedy_soup([seen[(i,)][SELECT_BY] for i in range(k)], score)
    best = {m: v for m, v in seen[tuple(soup["inputs"])].items() if m not in BASELINE_INFO}
    return {**best, "w": soup_weights(soup["inputs"], k).tolist(), "soup": soup["inputs"], "trials": soup["trials"]}


def baselines_key(ckpts: CheckpointSet, evaluator, cfg) -> dict:
    """What the baselines' metrics depend on: the inputs' content, the evaluation and sampler settings, the model
    shape, the EMA grid and the evaluator."""
    return {"inputs": list(hash_inputs(ckpts.paths).values()),
            **{k: plain_config({k: cfg.get(k)})[k] for k in ("eval", "sampler", "model", "baselines", "seed")},
            "evaluator": evaluator_key(evaluator)}
