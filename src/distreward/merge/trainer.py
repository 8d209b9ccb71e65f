"""RL over merging coefficients (METHOD.md §5): the loop, its baselines, logs, checkpoints and outputs.

One iteration: draw P candidate w ~ N(m, diag(s^2)); for each, merge theta(w) into one live network, draw n
samples with the deterministic inference ODE sampler from the iteration's shared noise and labels (the same for
every candidate), score the candidate by the set-replace FD reward of its n samples; normalise the P rewards;
update (m, log s) by PPO-clip (or REINFORCE) with Adam; the best candidate's samples then enter the reference set.
What is optimised is exactly what is served: the ODE samples of the merged model.

Under torchrun (WORLD_SIZE > 1) every rank runs the same loop with the same seed, so every rank holds the same
policy, generator and reference set. The P x n samples of an iteration (and the reference and evaluation samples)
are split over the ranks in whole sampler batches (`utils.dist.shard_blocks`); the features are gathered in
single-process order, so every rank scores the same candidates against the same reference set; rank 0's rewards
are broadcast, so every rank takes the same policy step and pushes the same rows. Only rank 0 writes files.
One process runs the single-process code unchanged (docs/scale.md, "Merging under torchrun").
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..utils import dist as D
from .policy import GaussianPolicy, normalise_rewards, policy_update, project_sum_one
from .reward import SetReplaceReward
from .streaming import CheckpointSet, list_snapshots

DEFAULTS: dict[str, Any] = {
    "name": "merge",
    "seed": 0,
    "device": "cpu",
    "merge": {
        "checkpoints": [],          # K .safetensors files, in training order (the last one is the "last" baseline)
        "snapshots": None,          # or a folder of EMA snapshots (train-base)
        "include": [],              # extra files appended to the list (e.g. the base model next to GRPO checkpoints)
        "init": "phema",            # phema (best EMA length of the grid) | uniform | last | [w_1, ..., w_K]
        "constraint": "sum1",       # sum1: candidates projected onto sum(w) = 1 | none
    },
    "policy": {"init_std": 0.05, "learn_std": True, "min_std": 1e-3},
    "rl": {
        "iterations": 20,
        "candidates": 8,            # P
        "samples": 200,             # n per candidate (shared noise and labels)
        "algorithm": "ppo",         # ppo | reinforce
        "epochs": 4,                # PPO epochs per iteration
        "clip": 0.2,
        "lr": 0.01,
        "entropy": 0.0,
    },
    "reward": {"features": "fmnist-reward", "reference_size": 1000, "real_stats": None},
    "sampler": {"steps": 16, "method": "heun", "shift": 1.0, "batch_size": 500},
    "model": {"num_classes": 10, "image_shape": [1, 32, 32]},
    "baselines": {"ema_grid": [0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25]},
    "eval": {"n": 2000, "seed": 1234},
    "checkpoint": {"every": 5},
}


# ----------------------------------------------------------------------------------------------------------
# Inputs

def open_checkpoints(merge_cfg) -> CheckpointSet:
    """The K inputs: merge.snapshots (a folder) or merge.checkpoints (files), plus merge.include."""
    snaps = merge_cfg.get("snapshots")
    ckpts = list(merge_cfg.get("checkpoints") or [])
    if snaps and ckpts:
        raise ValueError("give either merge.snapshots (a folder) or merge.checkpoints (files), not both")
    paths = snapshot_paths(_find(snaps)) if snaps else [_find(p) for p in ckpts]
    paths += [_find(p) for p in (merge_cfg.get("include") or [])]
    if not paths:
        raise ValueError("nothing to merge: pass --checkpoints A B ... or --snapshots DIR (merge.checkpoints / merge.snapshots)")
    return CheckpointSet.open(paths)


def snapshot_paths(folder: Path) -> list[Path]:
    """A folder's power-EMA snapshots in (step, std) order (train.phema), else its .safetensors by training step."""
    try:
        from ..train.phema import list_snapshots as list_phema

        return [s.path for s in list_phema(folder)]
    except (ImportError, FileNotFoundError):
        return list_snapshots(folder)


def _find(p) -> Path:
    """A path as given, else relative to the source checkout (where weights/ ships)."""
    from ..config import repo_path

    path = Path(str(p))
    if not path.exists() and not path.is_absolute() and repo_path(str(path)).exists():
        return repo_path(str(path))
    return path


# ----------------------------------------------------------------------------------------------------------
# Sampling (the deterministic inference sampler) and features

def shared_noise(n: int, image_shape, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n noise images and class-balanced labels from one seed: every candidate of an iteration gets these."""
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((n, *image_shape), generator=gen)
    labels = torch.arange(n) % num_classes if num_classes > 0 else None
    return noise, labels


def velocity_adapter(arch: str | None):
    from .. import sampling

    names = {"unet": "FlowVelocity", "sit": "SiTVelocity", "edm2": "EDMVelocity", None: "FlowVelocity"}
    if arch not in names:
        raise ValueError(f"no velocity adapter for network architecture {arch!r}")
    return getattr(sampling, names[arch])


def make_ode_sampler(arch: str | None, steps: int, method: str = "heun", shift: float = 1.0, batch_size: int = 500,
                     device="cpu") -> Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """sample(net, noise, labels) -> images in [-1, 1] with `ode_sample` (no randomness beyond the noise)."""
    from ..sampling import ode_sample, sigma_schedule

    adapter = velocity_adapter(arch)
    sigmas = sigma_schedule(int(steps), shift=float(shift)).to(device)

    @torch.no_grad()
    def sample(net, noise, labels):
        model = adapter(net)
        out = []
        for i in range(0, noise.shape[0], batch_size):
            lab = None if labels is None else labels[i:i + batch_size].to(device)
            out.append(ode_sample(model, noise[i:i + batch_size].to(device), lab, sigmas, method=method).clamp(-1, 1).cpu())
        return torch.cat(out)

    return sample


def make_feature_fn(name: str, device="cpu") -> Callable[[torch.Tensor], np.ndarray]:
    from ..features import compute_features, get_feature_network

    net = get_feature_network(name, device=device)
    return lambda images: compute_features(net, images)


def real_statistics(cfg, feature_fn, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu_r, Sigma_r) of the reward's features on the real training set (reward.real_stats file, else computed)."""
    from ..metrics import GaussianStats

    path = cfg.reward.get("real_stats")
    if path:
        st = GaussianStats.load(_find(path))
        return st.mu, st.sigma
    if cache is not None and cache.is_file():
        st = GaussianStats.load(cache)
        return st.mu, st.sigma
    from ..data import load_fmnist

    images, _ = load_fmnist("train")
    st = GaussianStats.from_features(feature_fn(images))
    if cache is not None:
        st.save(cache)
    return st.mu, st.sigma


# ----------------------------------------------------------------------------------------------------------
# Post-hoc EMA coefficients (the train package's least-squares solve)

def phema_weights(ckpts: CheckpointSet, sigma_rel: float) -> np.ndarray:
    """Coefficients over the K inputs that emulate an EMA of relative std `sigma_rel` at the latest snapshot step
    (the train package's least-squares solve; inputs without power-EMA metadata get 0)."""
    from ..train.phema import phema_coefficients

    snaps = snapshots_of(ckpts)
    used, x = phema_coefficients([s for s in snaps if s is not None], float(sigma_rel))
    coef = dict(zip([u.path for u in used], np.asarray(x, np.float64)))
    return np.array([coef.get(p, 0.0) for p in ckpts.paths])


def snapshots_of(ckpts: CheckpointSet) -> list:
    """A `train.phema.Snapshot` per input (None where the file carries no power-EMA metadata)."""
    from ..train.phema import Snapshot

    out = []
    for path, meta in zip(ckpts.paths, ckpts.meta):
        p = (meta.get("extra") or {}).get("phema") if isinstance(meta.get("extra"), dict) else None
        out.append(None if not p else Snapshot(path, float(p["std"]), int(p["step"]), float(p.get("kimg", 0.0)),
                                               int(p.get("batch", 0))))
    return out


def has_phema(ckpts: CheckpointSet) -> bool:
    """True when the inputs include power-EMA snapshots of at least two EMA profiles (the solve needs them)."""
    try:
        snaps = [s for s in snapshots_of(ckpts) if s is not None]
    except ImportError:
        return False
    return len({s.std for s in snaps}) >= 2


# ----------------------------------------------------------------------------------------------------------
# The RL loop

class MergeRL:
    """The state of one merge run: checkpoints, the live network, the policy, its optimizer and the reward."""

    def __init__(self, cfg, ckpts: CheckpointSet, init_mean, *, sample_fn, feature_fn, real_mu, real_sigma,
                 device="cpu"):
        self.cfg, self.ckpts, self.device = cfg, ckpts, device
        self.sample_fn, self.feature_fn = sample_fn, feature_fn
        self.net = ckpts.build_network(device).requires_grad_(False)
        pc = cfg.policy
        self.policy = GaussianPolicy(init_mean, float(pc.init_std), bool(pc.learn_std), float(pc.min_std))
        self.optimizer = torch.optim.Adam([p for p in self.policy.parameters() if p.requires_grad], lr=float(cfg.rl.lr))
        self.generator = torch.Generator().manual_seed(int(cfg.seed))
        self.reward = SetReplaceReward(real_mu, real_sigma)
        self.iteration = 0
        self.history: list[dict] = []

    def coefficients(self, w: torch.Tensor) -> torch.Tensor:
        """The drawn w as merged: projected onto sum(w) = 1 under merge.constraint = sum1."""
        c = self.cfg.merge.constraint
        if c == "sum1":
            return project_sum_one(w)
        if c == "none":
            return w
        raise ValueError(f"merge.constraint must be 'sum1' or 'none', got {c!r}")

    def mean_weights(self) -> np.ndarray:
        return self.coefficients(self.policy.mean.detach()).numpy().copy()

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
        d, n = self.reward.real_mu.size, noise.shape[0]
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
            self.reward.rows = self.feature_fn(self.images(self.mean_weights(), noise, labels))
        else:
            self.reward.rows = self.sharded_features([self.mean_weights()], noise, labels)[0].copy()
        self.reward.ptr = 0

    def step(self) -> dict:
        rl = self.cfg.rl
        t0 = time.perf_counter()
        noise, labels = self.noise(int(rl.samples), int(self.cfg.seed) * 100_003 + self.iteration)
        w = self.policy.sample(int(rl.candidates), self.generator)
        if D.world_size() == 1:
            feats = [self.feature_fn(self.images(self.coefficients(wi), noise, labels)) for wi in w]
        else:
            feats = self.sharded_features([self.coefficients(wi) for wi in w], noise, labels)
        t1 = time.perf_counter()
        fd_before = self.reward.fd() if self.reward.n else None
        r = self.reward.rewards(feats)
        if D.world_size() > 1:
            r = D.broadcast_object(r)   # rank 0's rewards: the same step on every replica, by construction
        adv = normalise_rewards(torch.from_numpy(r))
        stats = policy_update(self.policy, self.optimizer, w, adv, algorithm=rl.algorithm, epochs=int(rl.epochs),
                              clip=float(rl.clip), entropy=float(rl.entropy))
        self.reward.push(feats[int(np.argmax(r))])   # the best candidate's samples enter G
        self.iteration += 1
        mean = self.mean_weights()
        record = {"iteration": self.iteration, "r_mean": float(r.mean()), "r_std": float(r.std()),
                  "r_max": float(r.max()), "fd_ref": fd_before, **stats,
                  "std_mean": float(self.policy.std().detach().mean()), "time_sample": t1 - t0,
                  "time_total": time.perf_counter() - t0, "w": mean.tolist()}
        self.history.append(record)
        return record

    def state_dict(self) -> dict:
        from ..rl.state import rng_state

        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "reward": self.reward.state_dict(), "rng": rng_state(self.generator),
                "iteration": self.iteration, "history": json.dumps(self.history)}

    def load_state_dict(self, st: dict) -> None:
        from ..rl.state import set_rng_state

        self.policy.load_state_dict(st["policy"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.reward.load_state_dict(st["reward"])
        set_rng_state(self.generator, st["rng"])
        self.iteration = int(st["iteration"])
        self.history = json.loads(st["history"])


# ----------------------------------------------------------------------------------------------------------
# Evaluation and the baselines

def evaluate_weights(rl: MergeRL, w, evaluator, cfg) -> dict:
    """Held-out metrics of theta(w): cfg.eval.n ODE samples from the fixed evaluation seed (split over the ranks
    under torchrun in sampler batches, merged by `rl.grpo.sharded_metrics`)."""
    noise, labels = rl.noise(int(cfg.eval.n), int(cfg.eval.seed))
    if D.world_size() == 1:
        metrics = evaluator.evaluate(rl.images(np.asarray(w, np.float64), noise, labels))
    else:
        from ..rl.grpo import sharded_metrics

        batches = (images for _, images in rl.local_images([np.asarray(w, np.float64)], noise, labels))
        metrics = sharded_metrics(evaluator, batches, tuple(cfg.model.image_shape))
    out = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()}
    return out


def baseline_weights(ckpts: CheckpointSet, cfg) -> dict[str, np.ndarray]:
    """last (one-hot on the last input), uniform (1/K), and phema@<sigma_rel> for every EMA length of the grid."""
    k = ckpts.k
    out = {"last": np.eye(k)[k - 1], "uniform": np.full(k, 1.0 / k)}
    if has_phema(ckpts):
        for s in cfg.baselines.ema_grid:
            out[f"phema@{float(s):g}"] = phema_weights(ckpts, float(s))
    return out


def initial_mean(init, ckpts: CheckpointSet, baselines: dict[str, np.ndarray], results: dict[str, dict]) -> np.ndarray:
    """merge.init: phema (the best EMA length by fd_eval, uniform when no snapshot metadata), uniform, last, or a list."""
    if isinstance(init, str):
        if init == "phema":
            ph = [k for k in results if k.startswith("phema@")]
            if not ph:
                return baselines["uniform"].copy()
            return baselines[min(ph, key=lambda k: results[k]["fd_eval"])].copy()
        if init in ("uniform", "last"):
            return baselines[init].copy()
        raise ValueError(f"merge.init must be phema, uniform, last or a list of {ckpts.k} numbers, got {init!r}")
    w = np.asarray(list(init), np.float64)
    if w.shape != (ckpts.k,):
        raise ValueError(f"merge.init has {w.size} coefficients for {ckpts.k} checkpoints")
    return w


# ----------------------------------------------------------------------------------------------------------
# The run

def run_merge(cfg, run_dir, *, resume: bool = False, ckpts: CheckpointSet | None = None, sample_fn=None,
              feature_fn=None, evaluator=None, real_stats=None, progress: bool = True) -> dict:
    """Baselines, then RL over w, then the merged model. Writes into run_dir:

    config.yaml, metrics.jsonl, tb/, checkpoints/last.pt (resumable), baselines.json, coefficients.json,
    merged.safetensors (a generator file for every command), result.json. Returns the result dict.

    Under torchrun every rank calls this with the same cfg: sampling is split over the ranks, the policy and the
    reference set are replicas, and only rank 0 writes (the run directory must be shared for --resume).
    """
    from tqdm.auto import tqdm

    from ..config import save_config
    from ..rl.grpo import _NullWriter, _tensorboard, _truncate_jsonl
    from ..rl.state import load_checkpoint, save_checkpoint
    from ..utils.io import RunDir, atomic_save_json

    cfg = _with_defaults(cfg)
    device = str(D.init_distributed(cfg.device))      # cuda:LOCAL_RANK under torchrun; as given in one process
    main = D.is_main()
    progress = progress and main
    run = RunDir(run_dir)
    if main:
        save_config(cfg, run.path("config.yaml"))
    torch.manual_seed(int(cfg.seed))
    ckpts = open_checkpoints(cfg.merge) if ckpts is None else ckpts
    if sample_fn is None:
        s = cfg.sampler
        sample_fn = make_ode_sampler(ckpts.arch, int(s.steps), s.method, float(s.shift), int(s.batch_size), device)
    if feature_fn is None:
        feature_fn = make_feature_fn(cfg.reward.features, device)
    if real_stats is None:      # rank 0's statistics on every rank (the others wait for them)
        real_stats = D.broadcast_object(real_statistics(cfg, feature_fn, cache=run.path("real_stats_reward.npz"))
                                        if main else None)
    if evaluator is None:
        from ..evaluation import Evaluator

        with D.main_first():    # rank 0 fills the real-feature cache, the others read it
            evaluator = Evaluator.for_fmnist(device=device)

    # Baselines (cached in baselines.json so that --resume does not redo them)
    base_w = baseline_weights(ckpts, cfg)
    bpath = run.path("baselines.json")
    results: dict[str, dict] = json.loads(bpath.read_text()) if (resume and main and bpath.is_file()) else {}
    results = D.broadcast_object(results)
    probe = MergeRL(cfg, ckpts, base_w["uniform"], sample_fn=sample_fn, feature_fn=feature_fn,
                    real_mu=real_stats[0], real_sigma=real_stats[1], device=device)
    for name, w in tqdm(base_w.items(), desc="baselines", disable=not progress, leave=False):
        if name not in results:
            # phema at the snapshots' own EMA length is (numerically) the last snapshot: evaluate those weights once
            twin = next((k for k, r in results.items() if np.allclose(r["w"], w, rtol=0.0, atol=1e-6)), None)
            metrics = {k: v for k, v in results[twin].items() if k != "w"} if twin else evaluate_weights(probe, w, evaluator, cfg)
            results[name] = {**metrics, "w": w.tolist()}
            if main:
                atomic_save_json(bpath, results)
    del probe
    results = D.broadcast_object(results)   # the same initial mean on every rank, whatever the float rounding

    init = initial_mean(cfg.merge.init, ckpts, base_w, results)
    rl = MergeRL(cfg, ckpts, init, sample_fn=sample_fn, feature_fn=feature_fn, real_mu=real_stats[0],
                 real_sigma=real_stats[1], device=device)
    ckpt_path = run.checkpoints / "last.pt"
    if resume and D.broadcast_object(ckpt_path.is_file()):
        rl.load_state_dict(load_checkpoint(ckpt_path))
    else:
        if resume and main:
            print(f"no checkpoint in {run.checkpoints}; starting from iteration 0")
        rl.init_reference()
    if main:
        _truncate_jsonl(run.path("metrics.jsonl"), rl.iteration)
    writer = _tensorboard(run.root / "tb", rl.iteration) if main else _NullWriter()

    total = int(cfg.rl.iterations)
    bar = tqdm(range(rl.iteration, total), desc="merge RL", unit="it", disable=not progress, initial=rl.iteration, total=total)
    for _ in bar:
        record = rl.step()
        if main:
            run.log_jsonl(record)
        for k, v in record.items():
            if k not in ("iteration", "w") and v is not None:
                writer.add_scalar(k, v, rl.iteration)
        for i, wi in enumerate(record["w"]):
            writer.add_scalar(f"w/{i}", wi, rl.iteration)
        bar.set_postfix(r=f"{record['r_mean']:.3g}", fd_ref=f"{record['fd_ref']:.3g}" if record["fd_ref"] is not None else "-")
        if main and (rl.iteration % int(cfg.checkpoint.every) == 0 or rl.iteration == total):
            save_checkpoint(ckpt_path, rl.state_dict())
    bar.close()
    writer.close()

    w = rl.mean_weights()
    same = [k for k, b in base_w.items() if np.array_equal(init, b)]
    results["init"] = {**(results[same[0]] if same else evaluate_weights(rl, init, evaluator, cfg)), "w": init.tolist()}
    results["merged"] = {**evaluate_weights(rl, w, evaluator, cfg), "w": w.tolist()}
    ph = [k for k in results if k.startswith("phema@")]
    best_ema = min(ph, key=lambda k: results[k]["fd_eval"]) if ph else None
    sources = [str(p) for p in ckpts.paths]
    result = {"baselines": {k: v for k, v in results.items() if k not in ("merged", "init")}, "init": results["init"],
              "merged": results["merged"], "best_ema": best_ema, "checkpoints": sources, "history": rl.history,
              "model": str(run.root / "merged.safetensors")}
    if main:
        atomic_save_json(run.path("coefficients.json"), {"weights": w.tolist(), "checkpoints": sources,
                                                          "std": rl.policy.std().detach().tolist(),
                                                          "iterations": rl.iteration, "init": init.tolist()})
        ckpts.save(run.path("merged.safetensors"), w, extra={"merge_run": str(run.root), "iterations": rl.iteration})
        atomic_save_json(run.path("result.json"), result)
    D.barrier()                 # every rank returns once rank 0's files are written
    return result


def _with_defaults(cfg):
    from omegaconf import OmegaConf

    out = OmegaConf.merge(OmegaConf.create(DEFAULTS), cfg)
    OmegaConf.set_struct(out, False)
    return out
