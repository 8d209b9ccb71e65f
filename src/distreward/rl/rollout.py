"""Step 1 of a GRPO iteration: labels, starting noise, the old policy's stochastic rollouts and which of their
steps are trained (METHOD.md §4).

Every rank draws the global batch's labels and noise from the same generator and rolls out only its own rows
(`parallel.rollout_rows`), so one process is the world-size-1 case and the generators of all ranks stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling.generate import generate
from ..schema import ConfigError
from .parallel import rollout_rows
from .settings import window


@dataclass
class Rollouts:
    """What one iteration collects on this rank: labels, group ids, the trajectory and the advantages."""
    labels: torch.Tensor       # (B,)
    groups: torch.Tensor       # (B,)
    xs: torch.Tensor           # (T+1, B, C, H, W)
    log_probs: torch.Tensor    # (T, B)  log p_old per step
    sigmas: torch.Tensor       # (T+1,)
    adv: torch.Tensor | None = None


def draw_labels(P: int, G: int, num_classes: int, generator: torch.Generator, *, balanced: bool = False,
                start: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """P class labels, each repeated G times; group g holds the G samples of label g.

    balanced: the labels are positions [start, start + P) of a stream of shuffled blocks of all classes (block k
    shuffled by seed and k alone, so it needs no state to resume), so every class gets the same number of groups
    up to one block. The reference set then keeps the class balance of the real data; with independent draws an
    iteration that over-represents a class raises its FD by itself and rewards atypical samples of that class.
    """
    if not balanced:
        labels = torch.randint(0, num_classes, (P,), generator=generator)
    else:
        first, last = start // num_classes, (start + P - 1) // num_classes
        blocks = [torch.randperm(num_classes, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + k))
                  for k in range(first, last + 1)]
        offset = start - first * num_classes
        labels = torch.cat(blocks)[offset:offset + P]
    return labels.repeat_interleave(G), torch.arange(P).repeat_interleave(G)


def rollout_noise_levels(rl) -> list[float]:
    """The noise level a of each of the T rollout steps (`rl`: a validated config's rl section). The last step is
    never trained, so with clean_last_step it is the plain Euler step (a = 0): the sample the reward scores carries
    no leftover noise. With noise_steps 'window' only the trained window is stochastic and every other step is the
    ODE's Euler step, so the rollouts stay close to what the inference ODE sampler draws (as MixGRPO /
    Flow-GRPO-Fast); the schema has checked that the window is then the trained steps' mode."""
    T, a = int(rl.steps), float(rl.noise_level)
    levels = [a] * (T - 1) + [0.0 if rl.clean_last_step else a]
    if rl.noise_steps == "window":
        keep = set(trained_steps(T, "window", window=window(rl.train_steps.window)))
        levels = [x if j in keep else 0.0 for j, x in enumerate(levels)]
    return levels


def reference_noise_levels(rl) -> float | list[float]:
    """The sampler of the reference set's rows: the rollouts' (rl.reference = rollout), or the Euler ODE on the
    rollout grid (ode, a = 0 on every step): then the set holds what the inference sampler serves, and a candidate
    is rewarded for what it would fix in the ODE's distribution rather than the SDE's."""
    return 0.0 if rl.reference == "ode" else rollout_noise_levels(rl)


def start_noise(groups: torch.Tensor, image_shape, generator: torch.Generator, shared: bool = False) -> torch.Tensor:
    """The rollouts' starting noise x_1: independent per sample, or one draw per group shared by its G members.

    Shared (as DanceGRPO does): the samples of a group then differ only by the noise the SDE steps inject, which
    are the actions the log-probs score, so the group-relative advantage credits them and not the luck of x_1.
    """
    if not shared:
        return torch.randn((groups.shape[0], *image_shape), generator=generator)
    return torch.randn((int(groups.max()) + 1, *image_shape), generator=generator)[groups]


@torch.no_grad()
def collect(model, labels: torch.Tensor, groups: torch.Tensor, sigmas: torch.Tensor, a, image_shape,
            generator: torch.Generator, device="cpu", shared_noise: bool = False, rows: range | None = None) -> Rollouts:
    """Stochastic rollouts of the old policy, keeping every x_t and log p_old: the global batch's noise is drawn,
    this rank's `rows` (all of them by default) are rolled out."""
    rows = range(labels.shape[0]) if rows is None else rows
    noise = start_noise(groups, image_shape, generator, shared_noise)
    traj = rollout_rows(model, noise, labels, sigmas, a, generator, rows, device)
    sl = slice(rows.start, rows.stop)
    return Rollouts(labels=labels[sl], groups=groups[sl], xs=traj.xs, log_probs=traj.log_probs, sigmas=traj.sigmas)


@torch.no_grad()
def ode_rows(model, labels: torch.Tensor, image_shape, sigmas: torch.Tensor, generator: torch.Generator, device,
             decode=None, batch_size: int = 256) -> torch.Tensor:
    """Step 5 with rl.reference = ode: one Euler-ODE sample of the current policy per label, from fresh noise
    (the same draws on every rank, so every replica of the reference set takes the same rows); decoded, clamped."""
    noise = torch.randn((labels.shape[0], *image_shape), generator=generator)
    return generate(model, noise, labels, sigmas, method="euler", batch_size=batch_size, device=device, decode=decode)


def iteration_steps(rl, generator: torch.Generator) -> list[int]:
    """This iteration's trained steps under rl.train_steps (a validated config's rl section)."""
    ts = rl.train_steps
    return trained_steps(int(rl.steps), str(ts.mode), fraction=float(ts.fraction), window=window(ts.window),
                         generator=generator, count=ts.count)


def trained_steps(T: int, mode: str, *, fraction: float = 0.5, window: int | list | tuple = 5,
                  generator: torch.Generator | None = None, count: int | None = None) -> list[int]:
    """Which of the T sampler steps get a gradient: a random `fraction` of them, or a `window` at high noise
    (step indices [start, end) or its length from step 0); with `count`, a random `count` of the window's steps,
    drawn per iteration (the update's cost is proportional to the number of trained steps, so a batch can be larger
    for the same time). The last step (to sigma = 0) is never trained."""
    if T < 2:
        raise ConfigError(f"GRPO needs at least 2 sampler steps (the last one is never trained), got T={T}")
    last = T - 1
    if mode == "fraction":
        if not 0 < fraction <= 1:
            raise ConfigError(f"rl.train_steps.fraction must be in (0, 1], got {fraction}")
        k = max(1, min(last, round(fraction * last)))
        return sorted(torch.randperm(last, generator=generator)[:k].tolist())
    if mode == "window":
        start, end = (0, int(window)) if isinstance(window, int) else (int(window[0]), int(window[1]))
        end = min(end, last)
        if not 0 <= start < end:
            raise ConfigError(f"rl.train_steps.window {window} selects no step among 0..{last - 1} "
                             f"(T={T}, the last step is never trained); use e.g. window={min(5, last)}")
        steps = list(range(start, end))
        if count is None or int(count) >= len(steps):
            return steps
        if int(count) < 1:
            raise ConfigError(f"rl.train_steps.count must be >= 1 (or null for the whole window), got {count}")
        pick = torch.randperm(len(steps), generator=generator)[:int(count)]
        return sorted(steps[i] for i in pick.tolist())
    raise ConfigError(f"rl.train_steps.mode must be 'fraction' or 'window', got {mode!r}")
