"""Stages of the demo: what a stage is, what stages share (`DemoContext`), running them, and the user hook.

A stage is a named function `fn(ctx) -> dict` (JSON-able). Its result is written to <run_dir>/<stage>/stage.json
when it finishes, so a later run reuses it instead of running the stage again (`run_stages`).
`register_stage(Stage(...))` adds a stage after the built-in ones.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..build import load_base
from ..config import load_config
from ..evaluation import Evaluator
from ..rl.settings import resolve
from ..utils.io import atomic_save_json

DISTRIBUTION_PRESET = "fmnist_grpo"
SAMPLE_PRESET = "fmnist_grpo_sample"
METRIC_KEYS = ("fd_reward", "fd_eval", "precision", "recall", "kid", "n")


@dataclass
class Stage:
    """A named step of the demo: fn(ctx) -> result dict (JSON-able).

    `enabled(ctx)`: whether the stage runs in this demo; `section(result, ctx) -> markdown`: its own part of the
    report; `row`: the result is a row of the report's table (and a key of metrics.json either way)."""
    name: str
    fn: Callable[["DemoContext"], dict]
    enabled: Callable[["DemoContext"], bool] = lambda ctx: True
    section: Callable[[dict, "DemoContext"], str] | None = None
    row: bool = True


@dataclass
class DemoContext:
    """What stages share: the run directory, configs, the evaluator, the base model and earlier results."""
    run_dir: Path
    cfg: Any                      # resolved config of the distribution-wise run (model, eval settings)
    sample_cfg: Any               # resolved config of the sample-wise baseline
    compare: bool
    progress: bool
    fresh: bool = False
    results: dict = field(default_factory=dict)
    _evaluator: Any = None
    _base: Any = None

    @property
    def evaluator(self):
        """The evaluator given to `run_demo`, else the Fashion-MNIST one (built on first use)."""
        if self._evaluator is None:
            self._evaluator = Evaluator.for_fmnist(device=self.cfg.device)
        return self._evaluator

    @property
    def base_net(self):
        """The base generator of cfg.model.path (loaded on first use)."""
        if self._base is None:
            self._base = load_base(self.cfg.model, self.cfg.device)
        return self._base

    def stage_dir(self, name: str) -> Path:
        p = self.run_dir / name
        p.mkdir(parents=True, exist_ok=True)
        return p


def make_context(run_dir, *, compare: bool = False, overrides=(), sample_overrides=(), progress: bool = True,
                 evaluator=None) -> DemoContext:
    """The context of a demo run: both GRPO presets with `overrides` (and `sample_overrides` for the baseline)."""
    cfg = resolve(load_config(DISTRIBUTION_PRESET, overrides))
    sample_cfg = resolve(load_config(SAMPLE_PRESET, list(overrides) + list(sample_overrides)))
    return DemoContext(run_dir=Path(run_dir), cfg=cfg, sample_cfg=sample_cfg, compare=compare, progress=progress,
                       _evaluator=evaluator)


def metrics_only(m: dict) -> dict:
    """The metrics a table row shows (METRIC_KEYS) of an evaluation's result."""
    return {k: m[k] for k in METRIC_KEYS if k in m}


# ---------------------------------------------------------------------------------------------------------
# Stages added by users, and running stages

EXTRA_STAGES: list[Stage] = []   # filled by register_stage


def register_stage(stage: Stage) -> None:
    """Add a stage after the built-in ones (replacing a registered or built-in stage of the same name)."""
    EXTRA_STAGES[:] = [s for s in EXTRA_STAGES if s.name != stage.name] + [stage]


def with_extra_stages(builtin: list[Stage]) -> list[Stage]:
    """The built-in stages, then the registered ones (a registered stage replaces a built-in of its name)."""
    names = {s.name for s in EXTRA_STAGES}
    return [s for s in builtin if s.name not in names] + list(EXTRA_STAGES)


def run_stages(ctx: DemoContext, stages: list[Stage]) -> None:
    """Run each stage in order into ctx.results; a stage with a stage.json from an earlier run is reused (unless
    ctx.fresh)."""
    for s in stages:
        done = ctx.run_dir / s.name / "stage.json"
        if done.is_file() and not ctx.fresh:
            ctx.results[s.name] = json.loads(done.read_text())
            print(f"[demo] {s.name}: done before, reusing {done}")
            continue
        print(f"[demo] stage {s.name} ...")
        ts = time.perf_counter()
        result = s.fn(ctx)
        result["seconds"] = round(time.perf_counter() - ts, 1)
        ctx.results[s.name] = result
        atomic_save_json(ctx.stage_dir(s.name) / "stage.json", result)
