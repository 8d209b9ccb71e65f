"""Search over merging coefficients (METHOD.md §5): the search loop and the run (baselines, search, outputs).

One iteration: the searcher (`merge.search`, rl.algorithm) proposes P candidate w (by default w ~ N(m, diag(s^2)));
for each, merge theta(w) into one live network, draw n samples with the deterministic inference ODE sampler from
the iteration's shared noise and labels (the same for every candidate), score the candidate by the set-replace FD
reward of its n samples; the searcher is told the P rewards (by default: normalised, then a PPO-clip or REINFORCE
step with Adam on (m, log s)); the best candidate's samples then enter the reference set. What is optimised is
exactly what is served: the ODE samples of the merged model.

Under torchrun (WORLD_SIZE > 1) every rank runs the same loop with the same seed, so every rank holds the same
searcher state and reference set. The P x n samples of an iteration (and the reference and evaluation samples)
are split over the ranks in whole sampler batches (`utils.dist.shard_blocks`); the features are gathered in
single-process order, so every rank scores the same candidates against the same reference set; rank 0's rewards
are broadcast, so every rank takes the same search step and pushes the same rows. Only rank 0 writes files.
One process runs the single-process code unchanged (docs/scale.md, "Merging under torchrun").

Where each job lives: the parts a run is built from (`inputs.merge_parts`), the candidates' coefficient space,
samples, features and reward (`candidates`), the searchers (`search`), the baselines and held-out evaluations
(`baselines`), the checkpoint and the outputs (`state`); here: the search loop (`MergeRL.step`, `train`) and the
run (`run_merge`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import find_file
from ..evaluation import EvalCache
from ..reward import ReferenceSet
from ..schema import defaults, validate
from ..utils import dist as D
from ..utils.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from ..utils.configdiff import only_raise
from ..utils.hashing import input_files, weight_files
from ..utils.io import RunDir
from ..utils.progress import phase, progress as tqdm
from ..utils.rundir import add_inputs, prepare_run
from ..utils.runlog import RunLog
from .baselines import baseline_weights, best_baseline, evaluate_baselines, evaluate_weights, initial_mean
from .blocks import GROUPS
from .candidates import CandidateSampler, SetReward, as_merged, coefficient_rows
from .inputs import merge_parts, preset_inputs
from .policy import GaussianPolicy
from .search import make_searcher
from .state import load_search_state, save_outputs, search_state
from .streaming import CheckpointSet

# Defaults under every preset (configs/fmnist_merge_*.yaml override them), derived from the merge schema
# (distreward.schema; docs/configs.md lists every key).
DEFAULTS: dict[str, Any] = defaults("merge")

# Settings a resumed run can take new values of (with allow_changes / --allow-change KEY); docs/runs.md.
CHANGEABLE = {"rl.iterations": only_raise, "checkpoint.every": None, "name": None}
# Entries of a run directory that are inputs written before the run (merge_parts), not a previous run.
INPUT_FOLDERS = ("dry_run_inputs", "inputs")


# ----------------------------------------------------------------------------------------------------------
# The search loop

class MergeRL:
    """One merge search: the searcher (`merge.search`: the policy and its optimizer by default) over the
    coefficient space, its candidates' samples and features (`candidates.CandidateSampler`) and their reward
    (`candidates.SetReward`). Every searcher's candidates go through the same `step`: the same projection,
    samples, reward and push rule."""

    def __init__(self, cfg, ckpts: CheckpointSet, init_mean, *, sample_fn=None, feature_fn=None, real_mu, real_sigma,
                 device="cpu", sample_key: dict | None = None, sampler: CandidateSampler | None = None):
        """`sampler`: a CandidateSampler of these ckpts to search with (its live network is reused); else one is
        built from sample_fn, feature_fn, device and sample_key."""
        self.cfg, self.ckpts = cfg, ckpts
        self.sampler = sampler if sampler is not None else CandidateSampler(
            cfg, ckpts, sample_fn=sample_fn, feature_fn=feature_fn, device=device, sample_key=sample_key)
        self.rows = coefficient_rows(cfg, ckpts)
        self.searcher = make_searcher(cfg, np.tile(np.asarray(init_mean, np.float64).reshape(-1), self.rows))
        self.scorer = SetReward(real_mu, real_sigma)
        self.iteration = 0
        self.history: list[dict] = []

    @property
    def reward(self) -> ReferenceSet | None:
        """The reference set G of the reward (None before `init_reference`, or with reward.reference_size 0)."""
        return self.scorer.reference

    @property
    def policy(self) -> GaussianPolicy:
        """The Gaussian policy of the ppo / reinforce searcher (random search: its fixed sampling distribution)."""
        return self.searcher.policy

    def coefficients(self, w: torch.Tensor) -> torch.Tensor:
        """A drawn w as merged (`candidates.as_merged`)."""
        return as_merged(w, self.rows, self.cfg.merge.constraint)

    def mean_weights(self) -> np.ndarray:
        """The searcher's answer as merged: the policy mean (ppo, reinforce), CMA-ES's mean, random search's best."""
        return self.coefficients(self.searcher.result()).numpy().copy()

    def init_reference(self) -> None:
        """G: features of reference_size ODE samples of the initial mean model (its own seed stream)."""
        n = int(self.cfg.reward.reference_size)
        if n <= 0:
            return
        noise, labels = self.sampler.noise(n, int(self.cfg.seed) + 7_000_000)
        self.scorer.start(self.sampler.features([self.mean_weights()], noise, labels, self.scorer.dim)[0])

    def step(self) -> dict:
        """One iteration of any searcher: ask P candidates, score them (one path for all), tell, push."""
        rl = self.cfg.rl
        t0 = time.perf_counter()
        noise, labels = self.sampler.noise(int(rl.samples), int(self.cfg.seed) * 100_003 + self.iteration)
        w = self.searcher.ask()
        feats = self.sampler.features([self.coefficients(wi) for wi in w], noise, labels, self.scorer.dim)
        t1 = time.perf_counter()
        fd_before = self.scorer.fd()
        r = self.scorer(feats)
        if D.world_size() > 1:
            r = D.broadcast_object(r)   # rank 0's rewards: the same step on every replica, by construction
        stats = self.searcher.tell(w, r)
        self.scorer.push(feats[int(np.argmax(r))])   # the best candidate's samples enter G
        self.iteration += 1
        mean = self.mean_weights()
        record = {"iteration": self.iteration, "r_mean": float(r.mean()), "r_std": float(r.std()),
                  "r_max": float(r.max()), "fd_ref": fd_before, **stats,
                  "std_mean": float(self.searcher.std().mean()), "time_sample": t1 - t0,
                  "time_total": time.perf_counter() - t0, "w": mean.tolist()}
        self.history.append(record)
        return record


# ----------------------------------------------------------------------------------------------------------
# The run

def resolve(cfg):
    """A merge config (DictConfig, dict or None) over the trainer's DEFAULTS, checked in full (`schema.validate`):
    what run_merge runs."""
    return validate("merge", cfg)


def run_merge(cfg, run_dir, *, resume: bool = False, overwrite: bool = False, allow_changes: Sequence[str] = (),
              ckpts: CheckpointSet | None = None, sample_fn=None, feature_fn=None, evaluator=None, real_stats=None,
              progress: bool = True, eval_cache: EvalCache | None = None) -> dict:
    """Baselines, then RL over w, then the merged model. Writes into run_dir:

    config.yaml, provenance.json, metrics.jsonl, tb/, checkpoints/last.pt (resumable; last.pt.prev the one
    before), baselines.json (+ its key), real_stats_reward.npz (+ its key), coefficients.json, merged.safetensors
    (a generator file for every command), result.json. Returns the result dict.

    With resume=True the run continues from its checkpoint; a setting that differs from the saved config.yaml is
    refused unless named in `allow_changes` and in CHANGEABLE. Without resume, a run_dir holding a previous run is
    refused unless `overwrite` (then emptied, except the inputs merge_parts wrote: INPUT_FOLDERS). The directory is
    locked while the run lives (`utils.rundir.prepare_run`, docs/runs.md).

    Under torchrun every rank calls this with the same cfg: sampling is split over the ranks, the policy and the
    reference set are replicas, and only rank 0 writes (the run directory must be shared for --resume).

    `eval_cache` (an `evaluation.EvalCache`): the held-out evaluations (baselines, initial and merged weights) are
    read from / stored in it, keyed by the merged weights, when the sampler is built from cfg.sampler.

    Every part not given (ckpts, sample_fn, feature_fn, evaluator, real_stats) is built from cfg by
    `merge.inputs.merge_parts`, the one builder, whatever the config: dry-run inputs, EDM2 pickles, guidance,
    latent decoding, the reward's feature weights.
    """
    cfg = resolve(cfg)
    device = str(D.init_distributed(cfg.device))      # cuda:LOCAL_RANK under torchrun; as given in one process
    ckpts = preset_inputs(cfg, Path(run_dir)) if ckpts is None else ckpts
    run = prepare_run(run_dir, cfg, command="merge", resume=resume, overwrite=overwrite, allow_changes=allow_changes,
                      changeable=CHANGEABLE, main=D.is_main(), keep=INPUT_FOLDERS, defaults=DEFAULTS,
                      inputs=input_files(cfg, find_file) + list(ckpts.paths))
    try:
        return merge_run(cfg, run, device, resume=resume, ckpts=ckpts, sample_fn=sample_fn, feature_fn=feature_fn,
                         evaluator=evaluator, real_stats=real_stats, progress=progress, eval_cache=eval_cache)
    finally:
        run.close()


def merge_run(cfg, run: RunDir, device: str, *, resume: bool, ckpts: CheckpointSet, sample_fn, feature_fn, evaluator,
              real_stats, progress: bool, eval_cache: EvalCache | None = None) -> dict:
    """The merge run of `run_merge` in its prepared (locked, checked) run directory."""
    main = D.is_main()
    progress = progress and main
    torch.manual_seed(int(cfg.seed))
    if main:
        phase(f"merge: {ckpts.k} inputs from {describe_inputs(ckpts.paths)} ({ckpts.arch or 'unknown arch'}, "
              f"{len(ckpts.tensors)} tensors); run directory {run.root}")
    parts = merge_parts(cfg, run.root, device, ckpts=ckpts, sample_fn=sample_fn, feature_fn=feature_fn,
                        real_stats=real_stats, evaluator=evaluator)
    evaluator = parts.evaluator
    add_inputs(run, weight_files(evaluator, getattr(parts.feature_fn, "network", None)), main=main)
    sampler = CandidateSampler(cfg, ckpts, sample_fn=parts.sample_fn, feature_fn=parts.feature_fn, device=device,
                               sample_key=parts.sample_key)    # one live network: the baselines', then the search's

    base_w = baseline_weights(ckpts, cfg)
    results = evaluate_baselines(sampler, base_w, evaluator, cfg, run, resume, progress, eval_cache)
    init = initial_mean(cfg.merge.init, ckpts, base_w, results)
    rl = MergeRL(cfg, ckpts, init, real_mu=parts.real_stats[0], real_sigma=parts.real_stats[1], sampler=sampler)
    train(rl, run, resume, progress)

    w, searcher = rl.mean_weights(), rl.searcher.name
    same = [k for k, b in base_w.items() if np.array_equal(init, b)]
    if main:
        phase(f"final evaluation: {'the merged weights' if same else 'the initial and the merged weights'}, "
              f"{int(cfg.eval.n)} samples each")
    init_metrics = results[same[0]] if same else evaluate_weights(rl.sampler, init, evaluator, cfg, eval_cache)
    results["init"] = {**init_metrics, "w": init.tolist()}
    results["merged"] = {**evaluate_weights(rl.sampler, w, evaluator, cfg, eval_cache), "w": w.tolist()}
    best_ema = best_baseline(results, "phema@")
    sources = [str(p) for p in ckpts.paths]
    result = {"baselines": {k: v for k, v in results.items() if k not in ("merged", "init")}, "init": results["init"],
              "merged": results["merged"], "best_ema": best_ema, "searcher": searcher, "checkpoints": sources,
              "history": rl.history, "model": str(run.root / "merged.safetensors")}
    if main:
        save_outputs(run, rl, result, init)
    D.barrier()                 # every rank returns once rank 0's files are written
    return result


def describe_inputs(paths) -> str:
    """The folder of the inputs when they share one, else their names (shortened)."""
    folders = {str(p.parent) for p in paths}
    if len(folders) == 1:
        return next(iter(folders)) + "/"
    names = ", ".join(str(p) for p in paths[:3])
    return names + (f", ... ({len(paths)} files)" if len(paths) > 3 else "")


def train(rl: MergeRL, run: RunDir, resume: bool, progress: bool) -> None:
    """The search iterations up to rl.iterations, from checkpoints/last.pt with `resume`; logs and checkpoints."""
    main = D.is_main()
    ckpt_path = run.checkpoints / "last.pt"
    if resume and D.broadcast_object(checkpoint_exists(ckpt_path)):
        load_search_state(rl, load_checkpoint(ckpt_path))
        if main:
            phase(f"resumed from {ckpt_path} at iteration {rl.iteration}")
    else:
        if resume and main:
            print(f"no checkpoint in {run.checkpoints}; starting from iteration 0")
        if main and int(rl.cfg.reward.reference_size) > 0:
            phase(f"reference set: {int(rl.cfg.reward.reference_size)} samples of the initial merged model")
        rl.init_reference()
    log = RunLog(run.root, start=rl.iteration, enabled=main)
    total, every = int(rl.cfg.rl.iterations), int(rl.cfg.checkpoint.every)
    name = rl.searcher.name
    if main:
        phase(f"search ({name}): iterations {rl.iteration + 1}..{total}, {int(rl.cfg.rl.candidates)} candidates x "
              f"{int(rl.cfg.rl.samples)} samples each" if rl.iteration < total
              else f"search ({name}): all {total} iterations done")
    bar = tqdm(range(rl.iteration, total), desc=f"merge {name}", unit="it", disable=not progress, initial=rl.iteration,
               total=total)
    for _ in bar:
        record = rl.step()
        log.log(record)             # numbers only: the vector w goes in as w/<i>
        log.scalars(weight_scalars(record["w"]), rl.iteration, prefix="w/")
        bar.set_postfix(r=f"{record['r_mean']:.3g}", fd_ref=f"{record['fd_ref']:.3g}" if record["fd_ref"] is not None else "-")
        if main and (rl.iteration % every == 0 or rl.iteration == total):
            save_checkpoint(ckpt_path, search_state(rl))
    bar.close()
    log.close()


def weight_scalars(w) -> dict[str, float]:
    """The merged coefficients as named scalars: w/<i>, or w/<group>/<i> for per-block rows."""
    w = np.asarray(w, np.float64)
    if w.ndim == 1:
        return {str(i): float(x) for i, x in enumerate(w)}
    return {f"{g}/{i}": float(x) for g, row in zip(GROUPS, w) for i, x in enumerate(row)}
