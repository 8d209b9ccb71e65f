"""The schema of each command's config: finetune (GRPO), merge (RL over merging coefficients), train-base.

Every key a command reads is declared here with its type, default and allowed values; the trainers' DEFAULTS
are derived from these classes (`schema.defaults(command)`). A key with default ABSENT is optional: the config
lacks it unless given, and the code's fallback (the "absent" text) applies. Checks that involve several keys are
the `check_<command>` functions at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from .core import ABSENT, ConfigError, Options, Partial, fail, key, section, suggestion
from .keys import (ARCHS, EMA_STD_MAX, ODE_METHODS, REWARD_CREDITS, REWARD_KEYS, REWARD_MODES, VAE_CONVENTIONS,
                   check_window, device_key, dry_run_key, dry_run_of_key, name_key, seed_key, shape_key)
from .train_base import TrainBase, check_train_base

# ----------------------------------------------------------------------------------------------------------
# Sections shared by the commands

@dataclass
class VAE:
    """model.vae: the latent codec (distreward.models.vae.LatentCodec)."""
    path: Optional[str] = key(ABSENT, "folder with config.json + diffusion_pytorch_model.safetensors of an "
                                      "AutoencoderKL (e.g. weights/sd-vae-ft-ema)")
    config: Optional[dict] = key(ABSENT, "AutoencoderKL keywords of a small random VAE (dry runs); free-form")
    convention: str = key(ABSENT, "latent convention: sit (pixels [-1, 1], latents x 0.18215) or edm2 (pixels "
                                  "[0, 1], per-channel whitening)", choices=VAE_CONVENTIONS, absent="sit")
    dtype: str = key(ABSENT, "dtype of the VAE", choices=("float32", "float16", "bfloat16"), absent="float32")
    batch_size: int = key(ABSENT, "decoding batch", ge=1, absent="8")


@dataclass
class SDE:
    """eval.sde: options of SiT's SDE sampler (eval.sampler = sit-sde)."""
    diffusion_norm: float = key(ABSENT, "diffusion coefficient scale", ge=0, absent="1.0")
    last_step: Optional[str] = key(ABSENT, "the last step: drift only (mean), a plain Euler step, or none",
                                   choices=("mean", "euler"), absent="mean")
    last_step_size: float = key(ABSENT, "length of the last step", ge=0, lt=1, absent="0.04")


@dataclass
class Checkpoint:
    every: int = key(5, "iterations between checkpoints (checkpoints/last.pt; the last iteration always)", ge=1)


def features_key():
    return key(ABSENT, "FD evaluator on these feature networks (registry names, or random) with eval.real_stats; "
                       "absent: the Fashion-MNIST evaluator (fmnist-reward, fmnist-eval)")


def real_stats_key():
    return key(ABSENT, "real statistics per feature network ({name: .npz or EDM2 .pkl}; one path: the first network)")


def weights_key():
    return key(ABSENT, "weight file per feature network ({name: path or null}; null: $DISTREWARD_WEIGHTS)")


def feature_batch_key():
    return key(ABSENT, "feature-network batch of the evaluator", ge=1, absent="64")


# ----------------------------------------------------------------------------------------------------------
# finetune (GRPO, distreward.rl.finetune; docs/rl.md)

@dataclass
class GrpoModel:
    path: Optional[str] = key("weights/fmnist-base.safetensors",
                              "the base generator: a generator .safetensors file (used when model.checkpoint / "
                              "kwargs / vae are not set)")
    num_classes: int = key(10, "class count (labels 0..num_classes-1; the null label of guidance)", ge=1)
    image_shape: list[int] = shape_key([1, 32, 32], "what the policy generates (latents for latent models)")
    arch: str = key(ABSENT, "network family of model.checkpoint / model.kwargs", choices=ARCHS, absent="unet")
    checkpoint: Optional[str] = key(ABSENT, "an official checkpoint instead of model.path: SiT .pt, EDM2 .pkl")
    config: Optional[str] = key(ABSENT, "SiT preset of model.checkpoint, e.g. SiT-XL/2 (the head count is not in "
                                        "the weights)")
    kwargs: Optional[dict] = key(ABSENT, "network keywords: random weights of model.arch (dry runs); free-form")
    pixel_shape: Optional[list[int]] = key(ABSENT, "decoded image shape of a latent model (not read: documents it)",
                                           gt=0, length=3, why="channels, height, width")
    cfg_scale: Optional[float] = key(ABSENT, "classifier-free guidance scale (1: none)", ge=0, absent="1.0")
    vae: Optional[VAE] = section(VAE, "the latent codec: samples are decoded, then clamped, before rewards and "
                                      "evaluation", optional=True, absent="a pixel model")


@dataclass
class TrainSteps:
    mode: str = key("window", "which steps get a gradient: a window at high noise, or a random fraction",
                    choices=("window", "fraction"))
    window: Union[int, list[int]] = key(6, "mode window: its length from step 0, or [start, end)", check=check_window)
    fraction: float = key(0.5, "mode fraction: the share of the T - 1 trainable steps", gt=0, le=1)
    count: Optional[int] = key(None, "mode window: a random count of the window's steps per iteration (null: all)",
                               ge=1)


@dataclass
class PoolRound:
    """rl.algorithm = pool (distreward.rl.pool): each iteration is a round over a pool of the policy's samples."""
    size: int = key(4096, "M: class-balanced samples per round, the reward's reference set (reward.reference_size "
                          "= M)", ge=2)
    method: str = key("heun", "ODE method of the pool's samples", choices=ODE_METHODS)
    steps: int = key(8, "ODE steps of the pool's samples (near-converged)", ge=1)
    shard: int = key(500, "samples per shard file (a resumed round keeps its finished shards)", ge=1)
    epochs: int = key(2, "K: passes of the forward-process loss (nft.beta, nft.timesteps) over the pool", ge=1)
    minibatch: int = key(128, "samples per optimizer step", ge=1)
    credit: str = key("pool", "each sample scored against the whole pool, or against its class's part with that "
                              "class's real statistics (reward.per_class)", choices=("pool", "class"))


@dataclass
class GrpoRL:
    algorithm: str = key("grpo", "the trainer: GRPO on SDE rollouts, the forward-process trainer on ODE samples "
                                 "(nft section), or the pathwise one (pathwise section)",
                         choices=("grpo", "nft", "pool", "pathwise"))
    iterations: int = key(30, "GRPO iterations", ge=1)
    labels_per_iter: int = key(16, "P: groups (one label each) per iteration, split over the ranks", ge=1)
    labels: str = key("balanced", "label stream: every class equally often (balanced) or random",
                      choices=("balanced", "random"))
    shared_noise: bool = key(False, "one starting noise per group")
    push: str = key("all", "which samples enter the reference set after a step", choices=("all", "one_per_group"))
    reference: str = key("rollout", "the reference set's sampler: the rollouts (SDE) or Euler-ODE samples of the "
                                    "policy", choices=("rollout", "ode"))
    group_size: int = key(8, "G: samples per group", ge=2, why="advantages are relative within a group")
    steps: int = key(10, "T: SDE steps of a rollout", ge=2, why="the last step is never trained")
    shift: float = key(1.0, "time shift of the sigma schedule", gt=0)
    noise_level: float = key(0.7, "a: SDE noise level", gt=0,
                             why="a = 0 is the deterministic ODE: no log-prob for GRPO")
    clean_last_step: bool = key(True, "a = 0 on the last (never trained) step: rewards score noise-free samples")
    noise_steps: str = key("all", "noise on every step, or only on the trained window (ODE elsewhere)",
                           choices=("all", "window"))
    train_steps: TrainSteps = section(TrainSteps, "the trained steps of each iteration")
    inner_epochs: int = key(1, "passes over the batch per iteration", ge=1)
    minibatches: int = key(2, "minibatches per pass", ge=1)
    clip_eps: float = key(2e-4, "eps of the PPO clip (rho of log-probs averaged over dimensions stays near 1)",
                          gt=0, lt=1)
    beta: float = key(0.01, "weight of the KL term to the base policy", ge=0)
    adv_std: str = key("group", "advantages divided by the group's std or the batch's", choices=("group", "global"))
    adv_clip: float = key(5.0, "advantages clipped to [-adv_clip, adv_clip]", gt=0)
    lr: float = key(1e-4, "AdamW learning rate", ge=0)
    weight_decay: float = key(0.0, "AdamW weight decay", ge=0)
    adam_betas: list[float] = key([0.9, 0.999], "AdamW betas", ge=0, lt=1, length=2)
    grad_clip: float = key(1.0, "gradient-norm clip", gt=0)
    ema_decay: float = key(0.9, "decay of the EMA weights (evaluated and saved)", ge=0, lt=1)
    batch_size: int = key(256, "rollout / reference-set generation batch (per rank)", ge=1)
    null_control: str = key("none", "permute: the rewards of each iteration are permuted across the batch before "
                                    "the advantages (a null control with the real rewards' scale)",
                            choices=("none", "permute"))
    pool: PoolRound = section(PoolRound, "the pool-round trainer (rl.algorithm = pool)")


@dataclass
class GrpoReward:
    """reward: passed to distreward.reward.build_reward (docs/reward.md), except reference_size."""
    name: str = key("distribution", "the reward (any name and keys when finetune is given a reward object)",
                    allowed=" / ".join(REWARD_KEYS))
    features: str = key("fmnist-reward", "feature network: a registry name (fmnist-reward, fmnist-eval, inception, "
                                         "dinov2, random) or a .safetensors path")
    reference_size: int = key(1000, "N: rows of the reference set (samples of the base model at the start)", ge=1)
    weights: Optional[str] = key(ABSENT, "weight file of the feature network (null: $DISTREWARD_WEIGHTS or the "
                                         "evaluator's network)")
    mode: str = key(ABSENT, "distribution: subset-replace algorithm", choices=REWARD_MODES, absent="fast")
    credit: str = key(ABSENT, "distribution: each sample replaces a row alone (sample) or with its group",
                      choices=REWARD_CREDITS, absent="sample")
    scale: float = key(ABSENT, "distribution: reward multiplier", absent="1.0")
    eps: float = key(ABSENT, "distribution: relative eigenvalue floor of the linear mode", gt=0, absent="1e-10")
    quad_step: float = key(ABSENT, "distribution: quadrature step of the fast mode", gt=0, absent="0.3")
    batch_size: int = key(ABSENT, "feature-network batch", ge=1, absent="500")
    real_stats: Optional[str] = key(ABSENT, "distribution: real statistics (.npz of `distreward stats`, or an EDM2 "
                                            ".pkl)", absent="the evaluator's statistics of reward.features")
    init_features: Optional[str] = key(ABSENT, "distribution: .npy (N, d) initial reference rows",
                                       absent="N samples of the base model")
    refresh_every: Optional[int] = key(ABSENT, "distribution: rows pushed between exact recomputations of the sums",
                                       ge=1, absent="N")
    per_class: bool = key(ABSENT, "distribution: one reference set per class (N / classes rows each) against that "
                                  "class's real statistics: a sample is credited for what it fixes in its own class",
                          absent="off: one set against the marginal statistics")
    k: int = key(ABSENT, "knn: neighbour count", ge=1, absent="3")
    reduce: str = key(ABSENT, "knn: distance to the k-th neighbour or the mean of the k nearest",
                      choices=("kth", "mean"), absent="kth")
    real_features: Optional[str] = key(ABSENT, "knn: .npy (M, d) real features", absent="the evaluator's")

    @classmethod
    def allowed_keys(cls, value: dict, path: str, opts: Options):
        """The keys of the named reward (plus reference_size); free-form for a reward object of the caller's."""
        name = value.get("name", "distribution")
        if opts.own_reward:         # the section only names the caller's reward: its known keys are still typed
            return "free", ""
        if isinstance(name, str) and name in REWARD_KEYS:
            return REWARD_KEYS[name] | {"reference_size"}, f" for reward.name={name}"
        close = suggestion(name, REWARD_KEYS)
        hint = f"; did you mean {close!r}?" if close else ""
        fail(f"{path}.name", name, f"one of: {', '.join(REWARD_KEYS)}{hint}")


@dataclass
class GrpoEval:
    every: int = key(10, "iterations between evaluations of the EMA model (0: none)", ge=0)
    n: int = key(2000, "samples per evaluation", ge=1)
    steps: int = key(20, "steps of the served ODE sampler", ge=1)
    method: str = key("euler", "ODE method of the served sampler", choices=ODE_METHODS)
    seed: int = key(1234, "seed of the evaluation's noise and labels")
    grid: int = key(64, "images in each sample grid (samples/ema_<it>.png)", ge=1)
    batch_size: int = key(500, "sampling batch (per rank)", ge=1)
    sampler: str = key(ABSENT, "evaluation sampler: the flow ODE, or SiT's SDE sampler (SiT models)",
                       choices=("ode", "sit-sde"), absent="ode")
    sde: Optional[SDE] = section(SDE, "options of the sit-sde sampler", optional=True, absent="SiT's defaults")
    features: Optional[list[str]] = features_key()
    real_stats: Optional[Union[str, dict[str, Optional[str]]]] = real_stats_key()
    weights: Optional[dict[str, Optional[str]]] = weights_key()
    feature_batch_size: int = feature_batch_key()
    uncertainty: int = key(ABSENT, "bootstrap resamples of the generated rows for each FD's standard error "
                                   "(fd_*_err)", ge=0, absent="0: no uncertainty")
    fd_infinity: bool = key(ABSENT, "also report FD extrapolated to N = infinity (Chong & Forsyth)", absent="off")
    per_class: bool = key(ABSENT, "also report per-class FD (mean and worst class)", absent="off")


@dataclass
class GrpoDemo:
    crosscheck_steps: Optional[int] = key(ABSENT, "the demo evaluates every model again with this many Euler steps "
                                                  "(0 or null: no cross-check)", ge=0)


@dataclass
class Evidence:
    """How the demo and `distreward study` report a model (docs/metrics.md "Evidence protocol")."""
    validation_seed: int = key(777, "seed of the validation evaluations: the converged-step search and anything "
                                    "chosen by looking at numbers")
    report_seed: int = key(4321, "seed of the reported evaluations (fresh: used for nothing else)")
    n: Optional[int] = key(None, "samples per reported evaluation (null: eval.n)", ge=2)
    uncertainty: int = key(50, "bootstrap resamples behind each reported FD's standard error (fd_*_err)", ge=2)
    converged_steps: Optional[int] = key(None, "Heun steps of the converged solver (null: searched on the "
                                               "validation seed: the steps from which doubling moves FD by less "
                                               "than its standard error)", ge=1)
    search_n: int = key(500, "samples per evaluation of the converged-step search", ge=2)
    search_start: int = key(8, "first Heun step count of the search (then doubled)", ge=1)
    search_max: int = key(64, "largest Heun step count of the search", ge=2)
    test_split: bool = key(True, "also report FD against Fashion-MNIST test (fmnist evaluators only)")
    curve_n: int = key(500, "samples per point of the FD-vs-NFE plot (0: no plot)", ge=0)
    curve_nfe: list[int] = key([5, 10, 20, 40], "NFE of the FD-vs-NFE plot's points (Euler and Heun)", ge=1)


@dataclass
class Distill:
    """The distillation control of `distreward study` (distreward.rl.distill): the policy's velocities on the
    served grid regressed onto the base model's converged-solver trajectories, at GRPO's budget and settings."""
    teacher_steps: Optional[int] = key(None, "Heun steps of the teacher's trajectories (null: the converged steps "
                                             "of the evidence section, else 32)", ge=1)
    teacher_method: str = key("heun", "ODE method of the teacher", choices=ODE_METHODS)


@dataclass
class Pretrain:
    """The continued-training control (`pretrain`) and guidance distillation (`guidance-distill`) of `distreward
    study` (distreward.rl.pretrain): noised training images as the base training noises them (train-base's
    defaults), `steps` AdamW steps of `batch` images per iteration, the EMA at pretrain.ema_decay."""
    images: str = key("fmnist-train", "training images: fmnist-train, an .npz of uint8 images and labels, or a folder")
    lr: float = key(1e-4, "AdamW learning rate", ge=0)
    batch: int = key(128, "images per optimizer step", ge=1)
    steps: int = key(10, "optimizer steps per iteration", ge=1)
    ema_decay: Optional[float] = key(0.99, "decay of the EMA weights per optimizer step (null: rl.ema_decay); longer "
                                           "than the RL trainers' since every step sees fresh training images",
                                     ge=0, lt=1)
    match_wall_time: bool = key(True, "`distreward study` sets rl.iterations so that the measured seconds per iteration "
                                      "times it equal the config's trainer's training seconds (false: as given)")


@dataclass
class Guidance:
    """The guided reference rows of `distreward study`: the `guided` arm (the base sampled with classifier-free
    guidance) and the target of `guidance-distill` (the frozen base's guided velocity)."""
    scale: float = key(1.25, "w: the classifier-free guidance scale (null label: model.num_classes)", gt=0)


@dataclass
class Pathwise:
    """The pathwise trainer (rl.algorithm = pathwise, distreward.rl.pathwise): the FD's first variation of each
    sample back-propagated through the reward's feature network and the last k steps of the policy's ODE."""
    k: int = key(1, "K: the sampler's last steps that keep gradients (the earlier ones run without)", ge=1)
    method: str = key("euler", "ODE method of the samples", choices=ODE_METHODS)
    steps: Optional[int] = key(None, "ODE steps of the samples (null: eval.steps, the served sampler's)", ge=1)


@dataclass
class Nft:
    """The forward-process trainer (rl.algorithm = nft, distreward.rl.nft): ODE samples of the old policy, rewards
    turned into optimality weights, the flow-matching loss of implicit positive / negative policies."""
    method: str = key("heun", "ODE method of the rollouts", choices=ODE_METHODS)
    steps: Optional[int] = key(None, "ODE steps of the rollouts (null: eval.steps, the served sampler's)", ge=1)
    beta: float = key(1.0, "strength of the implicit policies v+- = v_old +- beta (v_theta - v_old)", gt=0)
    timesteps: int = key(2, "forward-process noise levels (sigma ~ U(0, 1)) per sample and update", ge=1)
    sigma_draw: str = key("iid", "how a sample's noise levels are drawn: iid U(0, 1), or stratified (one level in "
                                 "each of the equal strata of (0, 1); still U(0, 1) in marginal)",
                          choices=("iid", "stratified"))
    antithetic: bool = key(False, "noise levels in pairs sharing sigma with noises eps and -eps (nft.timesteps "
                                  "even; stratified: nft.timesteps / 2 strata)")
    old_decay: float = key(0.0, "eta: v_old <- eta v_old + (1 - eta) v_theta after each iteration (0: on-policy)",
                           ge=0, lt=1)


@dataclass
class Finetune:
    """`distreward finetune` (and the demo's GRPO runs): GRPO with a distribution-wise or sample-wise reward."""
    name: str = name_key("grpo")
    seed: int = seed_key()
    device: str = device_key()
    model: GrpoModel = section(GrpoModel, "the generator fine-tuned")
    rl: GrpoRL = section(GrpoRL, "GRPO")
    reward: GrpoReward = section(GrpoReward, "the reward")
    eval: GrpoEval = section(GrpoEval, "evaluation of the EMA model with the served sampler")
    checkpoint: Checkpoint = section(Checkpoint, "checkpoints")
    demo: Optional[GrpoDemo] = section(GrpoDemo, "settings of `distreward demo`", optional=True)
    evidence: Evidence = section(Evidence, "how the demo and `distreward study` report models: seeds, converged "
                                           "solver, uncertainty")
    distill: Distill = section(Distill, "the distillation control of `distreward study`")
    nft: Nft = section(Nft, "the forward-process trainer (rl.algorithm = nft)")
    pathwise: Pathwise = section(Pathwise, "the pathwise trainer (rl.algorithm = pathwise)")
    pretrain: Pretrain = section(Pretrain, "continued training and guidance distillation (`distreward study`)")
    guidance: Guidance = section(Guidance, "the guided reference rows of `distreward study`")
    dry_run: Optional[Partial] = dry_run_key()
    dry_run_of: Optional[str] = dry_run_of_key()


def check_finetune(cfg: dict) -> None:
    """Checks across keys of a finetune config (defaults merged)."""
    rl, reward = cfg["rl"], cfg["reward"]
    if reward.get("name") == "distribution" and reward.get("credit") == "group":
        fail("reward.credit", "group", "group credit gives every member of a group the group's reward, so the "
             "group-relative advantages are all zero; use reward.credit=sample (each sample replaces the same row)")
    if rl["algorithm"] in ("nft", "pathwise") and rl["shared_noise"]:
        fail("rl.shared_noise", True, f"the {rl['algorithm']} trainer samples with the deterministic ODE: a group "
             "sharing one starting noise holds G identical samples and no reward spread; use rl.shared_noise=false")
    if rl["algorithm"] == "pool" and reward.get("name") == "distribution":
        check_pool(rl["pool"], reward)
    nft = cfg["nft"]
    if nft["antithetic"] and nft["timesteps"] % 2:
        fail("nft.timesteps", nft["timesteps"], f"nft.antithetic pairs the noise levels; use an even nft.timesteps "
             f"such as {nft['timesteps'] + 1}, or nft.antithetic=false")
    ts = rl["train_steps"]
    if rl["noise_steps"] == "window" and ts["mode"] != "window":
        fail("rl.noise_steps", "window", "needs rl.train_steps.mode=window: the stochastic steps must be known "
             "before the rollout; use noise_steps=all with mode=fraction")
    if ts["mode"] == "window" and isinstance(ts["window"], list) and ts["window"][0] >= rl["steps"] - 1:
        fail("rl.train_steps.window", ts["window"], f"selects no step among 0..{rl['steps'] - 2} (rl.steps="
             f"{rl['steps']}, the last step is never trained)")
    check_vae(cfg.get("model") or {})


def check_pool(pool: dict, reward: dict) -> None:
    """The pool is the reward's reference set: as many rows, per class when the credit is by class."""
    if reward["reference_size"] != pool["size"]:
        fail("reward.reference_size", reward["reference_size"], f"the pool is the reference set: use "
             f"reward.reference_size={pool['size']} (rl.pool.size)")
    if bool(reward.get("per_class")) != (pool["credit"] == "class"):
        fail("rl.pool.credit", pool["credit"], "class credit scores with per-class reference sets: use "
             "rl.pool.credit=class with reward.per_class=true, or neither")


def check_vae(model: dict) -> None:
    vae = model.get("vae")
    if isinstance(vae, dict) and vae.get("path") is None and vae.get("config") is None:
        fail("model.vae", vae, "needs 'path' (a local AutoencoderKL folder) or 'config' (a random one, for dry runs)")


# ----------------------------------------------------------------------------------------------------------
# merge (RL over merging coefficients, distreward.merge.trainer.run_merge; docs/merge.md)

@dataclass
class MergeInputs:
    checkpoints: Optional[list[str]] = key([], "K generator .safetensors files in training order (the last one is "
                                               "the `last` baseline)")
    snapshots: Optional[str] = key(None, "or a folder of EMA snapshots (train-base's snapshots/)")
    include: Optional[list[str]] = key([], "files appended to the inputs (e.g. the base next to GRPO checkpoints)")
    init: Union[str, list[float]] = key("phema", "initial mean: the best post-hoc EMA length of the grid, the best "
                                                 "baseline (both by fd_reward on the validation evaluation), "
                                                 "uniform, the last input, or K numbers",
                                        choices=("phema", "best", "uniform", "last"))
    constraint: str = key("sum1", "candidates projected onto sum(w) = 1, or not", choices=("sum1", "none"))
    space: str = key("global", "one coefficient per input for the whole network, or one per input and block group "
                               "(input / middle / output blocks: merge.blocks)", choices=("global", "blocks"))
    format: Optional[str] = key(ABSENT, "input files: our .safetensors, or EDM2 pickles (converted once)",
                                choices=("safetensors", "edm2-pkl"), absent="safetensors")
    random_checkpoints: Optional[int] = key(ABSENT, "dry runs: this many random generator files of model.arch / "
                                                    "model.kwargs as the inputs (0 or null: off)", ge=0)


@dataclass
class Policy:
    init_std: float = key(0.05, "initial std s of the Gaussian policy over w (also CMA-ES's sigma0 and random "
                                "search's std)", gt=0)
    learn_std: bool = key(True, "learn log s (else fixed)")
    min_std: float = key(1e-3, "lower bound of s", gt=0)


@dataclass
class MergeRLSection:
    iterations: int = key(20, "RL iterations", ge=1)
    candidates: int = key(8, "P: candidate coefficient vectors per iteration", ge=2,
                          why="rewards are normalised across the candidates")
    samples: int = key(200, "n: samples per candidate (shared noise and labels)", ge=1)
    algorithm: str = key("ppo", "searcher: the policy updated by PPO-clip or REINFORCE, CMA-ES, or random search "
                                "(docs/merge.md, Searchers)", choices=("ppo", "reinforce", "cma", "random"))
    epochs: int = key(4, "PPO epochs per iteration", ge=1)
    clip: float = key(0.2, "PPO clip", gt=0, lt=1)
    lr: float = key(0.01, "Adam learning rate", ge=0)
    entropy: float = key(0.0, "entropy bonus weight", ge=0)


@dataclass
class MergeReward:
    features: str = key("fmnist-reward", "feature network of the reward (registry name, or random)")
    reference_size: int = key(1000, "rows of the reference set (0: the plain set FD of each candidate)", ge=0)
    real_stats: Optional[str] = key(None, "real statistics (.npz, EDM2 .pkl); null: computed from Fashion-MNIST train")
    weights: Optional[str] = key(ABSENT, "weight file of the feature network (null: $DISTREWARD_WEIGHTS)")


@dataclass
class Sampler:
    steps: int = key(16, "ODE steps", ge=1)
    method: str = key("heun", "ODE method", choices=ODE_METHODS)
    shift: float = key(1.0, "time shift of the flow schedule", gt=0)
    batch_size: int = key(500, "sampling batch (per rank; the unit of work across ranks)", ge=1)
    schedule: str = key(ABSENT, "the flow schedule, or EDM's rho schedule", choices=("flow", "edm"), absent="flow")
    sigma_min: float = key(ABSENT, "edm schedule: smallest sigma", gt=0, absent="0.002")
    sigma_max: float = key(ABSENT, "edm schedule: largest sigma", gt=0, absent="80.0")
    rho: float = key(ABSENT, "edm schedule: rho", gt=0, absent="7.0")


@dataclass
class MergeModel:
    num_classes: int = key(10, "class count of the inputs", ge=1)
    image_shape: list[int] = shape_key([1, 32, 32], "what the inputs generate (latents for latent models)")
    arch: str = key(ABSENT, "network family of merge.random_checkpoints", choices=ARCHS, absent="unet")
    kwargs: Optional[dict] = key(ABSENT, "network keywords of merge.random_checkpoints (dry runs); free-form")
    pixel_shape: Optional[list[int]] = key(ABSENT, "decoded image shape of a latent model (not read: documents it)",
                                           gt=0, length=3, why="channels, height, width")
    cfg_scale: Optional[float] = key(ABSENT, "classifier-free guidance scale (1: none)", ge=0, absent="1.0")
    vae: Optional[VAE] = section(VAE, "the latent codec of latent models", optional=True, absent="a pixel model")


@dataclass
class Baselines:
    ema_grid: list[float] = key([0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25], "post-hoc EMA lengths evaluated as "
                                "baselines (snapshot inputs)", gt=0, lt=EMA_STD_MAX, why="power-EMA profiles")
    greedy_soup: bool = key(False, "the greedy soup baseline (each input evaluated alone as one@<i>, then added to "
                                   "the soup in order while it lowers fd_reward)")


@dataclass
class MergeEval:
    n: int = key(2000, "held-out samples per evaluation", ge=1)
    seed: int = key(1234, "seed of the evaluation's noise and labels")
    features: Optional[list[str]] = features_key()
    real_stats: Optional[Union[str, dict[str, Optional[str]]]] = real_stats_key()
    weights: Optional[dict[str, Optional[str]]] = weights_key()
    feature_batch_size: int = feature_batch_key()


@dataclass
class Merge:
    """`distreward merge` (and the demo's merge stages): RL over the merging coefficients of checkpoints."""
    name: str = name_key("merge")
    seed: int = seed_key()
    device: str = device_key()
    merge: MergeInputs = section(MergeInputs, "the inputs")
    policy: Policy = section(Policy, "the Gaussian policy over the coefficients")
    rl: MergeRLSection = section(MergeRLSection, "the RL loop")
    reward: MergeReward = section(MergeReward, "the set-replace FD reward")
    sampler: Sampler = section(Sampler, "the inference ODE sampler (what is scored and served)")
    model: MergeModel = section(MergeModel, "the inputs' network")
    baselines: Baselines = section(Baselines, "baselines")
    eval: MergeEval = section(MergeEval, "held-out evaluation")
    checkpoint: Checkpoint = section(Checkpoint, "checkpoints")
    demo: Optional[Partial] = key(ABSENT, "`distreward demo` merges this block over the preset (its reduced size)")
    dry_run: Optional[Partial] = dry_run_key()
    dry_run_of: Optional[str] = dry_run_of_key()


def check_merge(cfg: dict) -> None:
    """Checks across keys of a merge config (defaults merged)."""
    m = cfg["merge"]
    if m.get("snapshots") and m.get("checkpoints"):
        fail("merge.snapshots", m["snapshots"], "give either merge.snapshots (a folder) or merge.checkpoints "
             "(files), not both")
    n, samples = cfg["reward"]["reference_size"], cfg["rl"]["samples"]
    if 0 < n <= samples:
        fail("reward.reference_size", n, f"0, or larger than rl.samples = {samples}: a candidate's samples would "
             "replace the whole reference set")
    s = cfg["sampler"]
    if s.get("schedule") == "edm" and s.get("sigma_min", 0.002) >= s.get("sigma_max", 80.0):
        fail("sampler.sigma_min", s.get("sigma_min", 0.002), f"< sampler.sigma_max = {s.get('sigma_max', 80.0)}")
    check_vae(cfg["model"])


# command -> (root section, checks across keys); the demo's GRPO runs are finetune configs.
COMMANDS: dict[str, tuple[type, Any]] = {
    "finetune": (Finetune, check_finetune),
    "merge": (Merge, check_merge),
    "train-base": (TrainBase, check_train_base),
    "demo": (Finetune, check_finetune),
}

__all__ = ["ARCHS", "COMMANDS", "ConfigError", "REWARD_KEYS", "VAE_CONVENTIONS", "REWARD_MODES", "REWARD_CREDITS"]
