"""Search over merging coefficients (METHOD.md §5): the loop, its baselines, logs, checkpoints and outputs.

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
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import find_file
from ..evaluation import EvalCache, cached_evaluation, eval_key
from ..evaluation.cache import CODE_PARTS
from ..evaluation.evaluator import evaluator_key
from ..evaluation.generator import plain_metrics, sharded_metrics
from ..metrics import sqrtm_psd
from ..reward import ReferenceSet, plain_set_rewards
from ..schema import defaults, validate
from ..sampling.generate import shared_noise
from ..utils import dist as D
from ..utils.checkpoint import checkpoint_exists, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..utils.io import RunDir, atomic_save_json
from ..utils.cache import cache_valid, save_cache_key
from ..utils.configdiff import only_raise, plain_config
from ..utils.hashing import hash_inputs, input_files, weight_files
from ..utils.rundir import add_inputs, prepare_run
from ..utils.progress import phase, progress as tqdm
from ..utils.runlog import RunLog
from .blocks import GROUPS
from .inputs import has_phema, merge_parts, phema_weights, preset_inputs
from .policy import GaussianPolicy, project_sum_one
from .search import make_searcher
from .soup import greedy_soup, soup_weights
from .streaming import CheckpointSet

# Defaults under every preset (configs/fmnist_merge_*.yaml override them), derived from the merge schema
# (distreward.schema; docs/configs.md lists every key).
DEFAULTS: dict[str, Any] = defaults("merge")

# Settings a resumed run can take new values of (with allow_changes / --allow-change KEY); docs/runs.md.
CHANGEABLE = {"rl.iterations": only_raise, "checkpoint.every": None, "name": None}
# Entries of a run directory that are inputs written before the run (merge_parts), not a previous run.
INPUT_FOLDERS = ("dry_run_inputs", "inputs")


# ----------------------------------------------------------------------------------------------------------
# The RL loop

class MergeRL:
    """The state of one merge run: checkpoints, the live network, the searcher (`merge.search`: the policy and its
    optimizer by default) and the reward. Every searcher's candidates go through the same `step`: the same
    projection, samples, reward and push rule.

    The reward is `reward.ReferenceSet.set_rewards` (group credit, one group per candidate): r_c = FD(G) -
    FD(G - S + X_c), every candidate's n samples X_c replacing the same n oldest rows S of the reference set G;
    `self.reward` is that ReferenceSet (None with reward.reference_size 0: then r_c = -FD(X_c)).
    """

    def __init__(self, cfg, ckpts: CheckpointSet, init_mean, *, sample_fn, feature_fn, real_mu, real_sigma,
                 device="cpu", sample_key: dict | None = None):
        self.cfg, self.ckpts, self.device = cfg, ckpts, device
        self.sample_fn, self.feature_fn = sample_fn, feature_fn
        self.sample_key = sample_key     # the settings sample_fn was built from (None: the caller's own sampler)
        self.net = ckpts.build_network(device).requires_grad_(False)
        self.rows = self.block_rows(cfg, ckpts)
        self.searcher = make_searcher(cfg, np.tile(np.asarray(init_mean, np.float64).reshape(-1), self.rows))
        self.real_mu = np.asarray(real_mu, np.float64).reshape(-1)
        self.real_sigma = np.asarray(real_sigma, np.float64)
        self.real_sigma_half = sqrtm_psd(self.real_sigma)
        self.reward: ReferenceSet | None = None
        self.iteration = 0
        self.history: list[dict] = []

    @staticmethod
    def block_rows(cfg, ckpts: CheckpointSet) -> int:
        """Rows of coefficients: 1 (merge.space global) or one per block group (blocks; the network's tensors are
        checked to fall in the groups here, before any sampling)."""
        space = str(cfg.merge.get("space", "global"))
        if space == "global":
            return 1
        if space != "blocks":
            raise ValueError(f"merge.space must be 'global' or 'blocks', got {space!r}")
        ckpts.block_groups()
        return len(GROUPS)

    def coefficients(self, w: torch.Tensor) -> torch.Tensor:
        """The drawn w as merged: (K,), or (len(GROUPS), K) rows of a flat per-block draw; each row projected onto
        sum(w) = 1 under merge.constraint = sum1."""
        if self.rows > 1:
            w = w.reshape(self.rows, -1)
        c = self.cfg.merge.constraint
        if c == "sum1":
            return project_sum_one(w)
        if c == "none":
            return w
        raise ValueError(f"merge.constraint must be 'sum1' or 'none', got {c!r}")

    @property
    def policy(self) -> GaussianPolicy:
        """The Gaussian policy of the ppo / reinforce searcher (random search: its fixed sampling distribution)."""
        return self.searcher.policy

    def mean_weights(self) -> np.ndarray:
        """The searcher's answer as merged: the policy mean (ppo, reinforce), CMA-ES's mean, random search's best."""
        return self.coefficients(self.searcher.result()).numpy().copy()

    def images(self, w, noise, labels) -> torch.Tensor:
        self.ckpts.merge_into(self.net, w)
        return self.sample_fn(self.net, noise, labels)

    @property
    def block(self) -> int:
        """Rows per work unit across ranks: the sampler's batch size, so every batch is the one-process batch."""
        return int((self.cfg.get("sampler") or {}).get("batch_size", DEFAULTS["sampler"]["batch_size"]))

    def local_images(self, weights: list, noise, labels):
        """(model index, images) of this rank's pieces of len(weights) models x noise.shape[0] samples, one
        sampler batch at a time; each model is merged once."""
        for c, rows in D.shard_blocks(len(weights), noise.shape[0], self.block):
            self.ckpts.merge_into(self.net, weights[c])
            for lo in range(rows.start, rows.stop, self.block):
                hi = min(rows.stop, lo + self.block)
                yield c, self.sample_fn(self.net, noise[lo:hi], None if labels is None else labels[lo:hi])

    def sharded_features(self, weights: list, noise, labels) -> list[np.ndarray]:
        """The reward features of the samples of each model in `weights` (all from the same noise and labels),
        computed over the ranks and gathered: every rank gets all of them, in single-process order."""
        local = [np.asarray(self.feature_fn(im), np.float64) for _, im in self.local_images(weights, noise, labels)]
        d, n = self.real_mu.size, noise.shape[0]
        f = D.all_gather_rows(np.concatenate(local) if local else np.zeros((0, d)))
        return [f[i * n:(i + 1) * n] for i in range(len(weights))]

    def noise(self, n: int, seed: int):
        m = self.cfg.model
        return shared_noise(n, tuple(m.image_shape), int(m.num_classes), seed)

    def init_reference(self) -> None:
        """G: features of reference_size ODE samples of the initial mean model (its own seed stream)."""
        n = int(self.cfg.reward.reference_size)
        if n <= 0:
            return
        noise, labels = self.noise(n, int(self.cfg.seed) + 7_000_000)
        if D.world_size() == 1:
            rows = self.feature_fn(self.images(self.mean_weights(), noise, labels))
        else:
            rows = self.sharded_features([self.mean_weights()], noise, labels)[0]
        self.reward = ReferenceSet(rows, self.real_mu, self.real_sigma)

    def rewards(self, feats: list[np.ndarray]) -> np.ndarray:
        """One reward per candidate feature set (each (n, d), the same n for all), higher is better."""
        if self.reward is None:
            return plain_set_rewards(feats, self.real_mu, self.real_sigma, self.real_sigma_half)
        if feats[0].shape[0] >= self.reward.n:
            raise ValueError(f"a candidate's {feats[0].shape[0]} samples would replace the whole reference set of "
                             f"{self.reward.n}; set reward.reference_size larger than rl.samples (or 0 for the plain "
                             "set FD)")
        return self.reward.set_rewards(feats)

    def candidate_features(self, w: torch.Tensor, noise, labels) -> list[np.ndarray]:
        """The reward features of each raw candidate's samples, the candidate projected (`coefficients`) first."""
        if D.world_size() == 1:
            return [self.feature_fn(self.images(self.coefficients(wi), noise, labels)) for wi in w]
        return self.sharded_features([self.coefficients(wi) for wi in w], noise, labels)

    def step(self) -> dict:
        """One iteration of any searcher: ask P candidates, score them (one path for all), tell, push."""
        rl = self.cfg.rl
        t0 = time.perf_counter()
        noise, labels = self.noise(int(rl.samples), int(self.cfg.seed) * 100_003 + self.iteration)
        w = self.searcher.ask()
        feats = self.candidate_features(w, noise, labels)
        t1 = time.perf_counter()
        fd_before = self.reward.fd() if self.reward is not None else None
        r = self.rewards(feats)
        if D.world_size() > 1:
            r = D.broadcast_object(r)   # rank 0's rewards: the same step on every replica, by construction
        stats = self.searcher.tell(w, r)
        if self.reward is not None:
            self.reward.push(feats[int(np.argmax(r))])   # the best candidate's samples enter G
        self.iteration += 1
        mean = self.mean_weights()
        record = {"iteration": self.iteration, "r_mean": float(r.mean()), "r_std": float(r.std()),
                  "r_max": float(r.max()), "fd_ref": fd_before, **stats,
                  "std_mean": float(self.searcher.std().mean()), "time_sample": t1 - t0,
                  "time_total": time.perf_counter() - t0, "w": mean.tolist()}
        self.history.append(record)
        return record

    def state_dict(self) -> dict:
        reward = {"rows": None, "ptr": 0} if self.reward is None else self.reward.state_dict()
        return {**self.searcher.state_dict(), "searcher": self.searcher.name, "reward": reward,
                "rng": rng_state(self.searcher.generator), "iteration": self.iteration,
                "history": json.dumps(self.history)}

    def load_state_dict(self, st: dict) -> None:
        saved = st.get("searcher", self.searcher.name)     # checkpoints before the searchers: ppo or reinforce
        if saved != self.searcher.name:
            raise ValueError(f"the checkpoint is of the {saved!r} searcher, the config asks for "
                             f"rl.algorithm={self.searcher.name!r}; resume with rl.algorithm={saved}")
        self.searcher.load_state_dict(st)
        self.load_reward_state(st["reward"])
        set_rng_state(self.searcher.generator, st["rng"])
        self.iteration = int(st["iteration"])
        self.history = json.loads(st["history"])

    def load_reward_state(self, sd: dict) -> None:
        """The reference set of a checkpoint: ReferenceSet.state_dict(), or the {rows, ptr} of runs written before
        the merge reward was a ReferenceSet (its sums are then recomputed from the rows)."""
        self.reward = None if sd["rows"] is None else ReferenceSet(sd["rows"], self.real_mu, self.real_sigma)
        if self.reward is not None and "s1" in sd:
            self.reward.load_state_dict(sd)
        elif self.reward is not None:
            self.reward.ptr = int(sd["ptr"]) % self.reward.n


# ----------------------------------------------------------------------------------------------------------
# Evaluation and the baselines

def evaluate_weights(rl: MergeRL, w, evaluator, cfg, cache: EvalCache | None = None) -> dict:
    """Held-out metrics of theta(w): cfg.eval.n ODE samples from the fixed evaluation seed (split over the ranks
    under torchrun in sampler batches, merged by `evaluation.generator.sharded_metrics`). `cache`: through the
    evaluation cache, keyed by the merged weights (`merge_eval_key`; nothing is cached with a sampler of the
    caller's, `rl.sample_key` None)."""
    w = np.asarray(w, np.float64)
    noise, labels = rl.noise(int(cfg.eval.n), int(cfg.eval.seed))

    def compute():
        if D.world_size() == 1:
            return evaluator.evaluate(rl.images(w, noise, labels)), None
        batches = (images for _, images in rl.local_images([w], noise, labels))
        return sharded_metrics(evaluator, batches, tuple(cfg.model.image_shape)), None

    key = None
    if cache is not None and rl.sample_key is not None:
        rl.ckpts.merge_into(rl.net, w)          # the weights evaluated: hashed into the key
        key = merge_eval_key(rl, evaluator, cfg)
    return plain_metrics(cached_evaluation(cache, key, compute, desc="merge evaluation")[0])


def merge_eval_key(rl: MergeRL, evaluator, cfg) -> dict | None:
    """The evaluation cache key of `evaluate_weights` with the live network's (merged) weights: the merge's own
    sampling protocol (cfg.eval n and seed, shared seeded noise and balanced labels, the sampler settings that
    built rl.sample_fn) and the code of the merge's sampler besides the evaluation's."""
    sampling = {"scheme": "merge-shared-noise", "n": int(cfg.eval.n), "seed": int(cfg.eval.seed),
                "num_classes": int(cfg.model.num_classes), "image_shape": list(cfg.model.image_shape),
                "sampler": rl.sample_key}
    return eval_key(rl.net, evaluator, sampling, arch=str(rl.ckpts.arch), device=rl.device,
                    code=CODE_PARTS + ("merge/inputs.py",))


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
    sample_fn, sample_key, feature_fn = parts["sample_fn"], parts["sample_key"], parts["feature_fn"]
    real_stats, evaluator = parts["real_stats"], parts["evaluator"]
    add_inputs(run, weight_files(evaluator, getattr(feature_fn, "network", None)), main=main)

    def merge_rl(init_mean) -> MergeRL:
        return MergeRL(cfg, ckpts, init_mean, sample_fn=sample_fn, feature_fn=feature_fn, real_mu=real_stats[0],
                       real_sigma=real_stats[1], device=device, sample_key=sample_key)

    base_w = baseline_weights(ckpts, cfg)
    results = evaluate_baselines(merge_rl(base_w["uniform"]), base_w, evaluator, cfg, run, resume, progress,
                                 eval_cache)
    init = initial_mean(cfg.merge.init, ckpts, base_w, results)
    rl = merge_rl(init)
    train(rl, run, resume, progress)

    w, searcher = rl.mean_weights(), rl.searcher.name
    same = [k for k, b in base_w.items() if np.array_equal(init, b)]
    if main:
        phase(f"final evaluation: {'the merged weights' if same else 'the initial and the merged weights'}, "
              f"{int(cfg.eval.n)} samples each")
    results["init"] = {**(results[same[0]] if same else evaluate_weights(rl, init, evaluator, cfg, eval_cache)),
                       "w": init.tolist()}
    results["merged"] = {**evaluate_weights(rl, w, evaluator, cfg, eval_cache), "w": w.tolist()}
    best_ema = best_baseline(results, "phema@")
    sources = [str(p) for p in ckpts.paths]
    result = {"baselines": {k: v for k, v in results.items() if k not in ("merged", "init")}, "init": results["init"],
              "merged": results["merged"], "best_ema": best_ema, "searcher": searcher, "checkpoints": sources,
              "history": rl.history, "model": str(run.root / "merged.safetensors")}
    if main:
        atomic_save_json(run.path("coefficients.json"), {"weights": w.tolist(), "searcher": searcher,
                                                          "space": str(cfg.merge.get("space", "global")),
                                                          "checkpoints": sources,
                                                          "std": rl.searcher.std().numpy().reshape(w.shape).tolist(),
                                                          "iterations": rl.iteration, "init": init.tolist()})
        ckpts.save(run.path("merged.safetensors"), w, extra={"merge_run": str(run.root), "iterations": rl.iteration,
                                                             "searcher": searcher})
        atomic_save_json(run.path("result.json"), result)
    D.barrier()                 # every rank returns once rank 0's files are written
    return result


def describe_inputs(paths) -> str:
    """The folder of the inputs when they share one, else their names (shortened)."""
    folders = {str(p.parent) for p in paths}
    if len(folders) == 1:
        return next(iter(folders)) + "/"
    names = ", ".join(str(p) for p in paths[:3])
    return names + (f", ... ({len(paths)} files)" if len(paths) > 3 else "")


def evaluate_baselines(probe: MergeRL, base_w: dict[str, np.ndarray], evaluator, cfg, run: RunDir, resume: bool,
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


def train(rl: MergeRL, run: RunDir, resume: bool, progress: bool) -> None:
    """The search iterations up to rl.iterations, from checkpoints/last.pt with `resume`; logs and checkpoints."""
    main = D.is_main()
    ckpt_path = run.checkpoints / "last.pt"
    if resume and D.broadcast_object(checkpoint_exists(ckpt_path)):
        rl.load_state_dict(load_checkpoint(ckpt_path))
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
            save_checkpoint(ckpt_path, rl.state_dict())
    bar.close()
    log.close()


def weight_scalars(w) -> dict[str, float]:
    """The merged coefficients as named scalars: w/<i>, or w/<group>/<i> for per-block rows."""
    w = np.asarray(w, np.float64)
    if w.ndim == 1:
        return {str(i): float(x) for i, x in enumerate(w)}
    return {f"{g}/{i}": float(x) for g, row in zip(GROUPS, w) for i, x in enumerate(row)}
