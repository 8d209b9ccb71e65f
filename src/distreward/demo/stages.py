"""Stages of the demo: what a stage is, what stages share (`DemoContext`), running them, and the user hook.

A stage is a named function `fn(ctx) -> dict` (JSON-able). Its result is written to <run_dir>/<stage>/stage.json
when it finishes, so a later run reuses it instead of running the stage again (`run_stages`) -- but only when it
was computed from the same settings: each stage has a key (what it depends on: its config, the base model's and
its other inputs' sha256, the evaluator, the earlier stages it reads), recorded in <run_dir>/stages.json. A stage
whose key changed is run again from a clean stage directory (its trainer with overwrite=True: `ctx.clean`); a
stage started with the same key and not finished (killed) resumes (its trainer with resume=True).
`register_stage(Stage(...))` adds a stage after the built-in ones.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import OmegaConf

from ..build import generator_file, load_base
from ..config import load_config
from ..evaluation import EvalCache, Evaluator, eval_cache_for
from ..evaluation.evaluator import evaluator_key
from ..rl.settings import resolve, with_sample_reward
from ..schema import ConfigError
from ..utils.io import atomic_save_json
from ..utils.configdiff import changed_keys, plain_config
from ..utils.hashing import file_sha256

DISTRIBUTION_PRESET = "fmnist_nft"     # the default trainer: forward-process (docs/rl.md "Choosing the demo's trainer")
METRIC_KEYS = ("fd_reward", "fd_eval", "precision", "recall", "density", "coverage", "kid", "n")


@dataclass
class Stage:
    """A named step of the demo: fn(ctx) -> result dict (JSON-able).

    `enabled(ctx)`: whether the stage runs in this demo; `section(result, ctx) -> markdown`: its own part of the
    report; `row`: the result is a row of the report's table (and a key of metrics.json either way); `key(ctx)
    -> JSON-able`: what its result depends on (default `default_key`: both configs, the base model, the
    evaluator and every earlier stage)."""
    name: str
    fn: Callable[["DemoContext"], dict]
    enabled: Callable[["DemoContext"], bool] = lambda ctx: True
    section: Callable[[dict, "DemoContext"], str] | None = None
    row: bool = True
    key: Callable[["DemoContext"], Any] | None = None


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
    clean: bool = False           # set by run_stages for the running stage: start its run directory afresh
    digests: dict = field(default_factory=dict)   # stage name -> digest of its key (finished or reused stages)
    eval_cache_setting: Any = "auto"   # "auto": beside the evaluator's real-feature cache; a folder; None: off
    _evaluator: Any = None
    _base: Any = None
    _evaluator_key: Any = None
    _eval_cache: Any = False           # False: not resolved yet

    @property
    def eval_cache(self) -> EvalCache | None:
        """The evaluation cache of the demo's model evaluations (`evaluation.EvalCache`; None: off). "auto":
        `<evaluator.cache_dir>/evals` (runs/.cache/evals for the Fashion-MNIST evaluator; none for an evaluator
        without a cache folder)."""
        if self._eval_cache is False:
            self._eval_cache = eval_cache_for(self.eval_cache_setting, self.evaluator)
        return self._eval_cache

    @property
    def evaluator_key(self) -> dict:
        """`evaluation.evaluator.evaluator_key` of the evaluator (computed once)."""
        if self._evaluator_key is None:
            self._evaluator_key = evaluator_key(self.evaluator)
        return self._evaluator_key

    def base_sha256(self) -> str:
        """sha256 of the base's file, named as a fine-tuned model's metadata names it (`base_sha256`)."""
        return file_sha256(generator_file(self.cfg.model))

    def trainer_args(self) -> dict:
        """resume / overwrite for the running stage's trainer: a clean start or a resume of the same settings."""
        return {"resume": not self.clean, "overwrite": self.clean}

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
                 evaluator=None, eval_cache: Any = "auto", preset: str = DISTRIBUTION_PRESET) -> DemoContext:
    """The context of a demo run: the distribution-wise fine-tuning `preset` (a finetune preset's name or file)
    with `overrides`, and the sample-wise baseline: the same config with the classifier reward
    (`rl.settings.with_sample_reward`), then `sample_overrides`; `eval_cache`: "auto", a folder, an `EvalCache` or
    None (see `DemoContext.eval_cache`)."""
    cfg = resolve(load_config(preset, overrides))
    if cfg.reward.name != "distribution":
        raise ConfigError(f"the demo fine-tunes with the distribution-wise reward, but preset {preset!r} has "
                          f"reward.name={cfg.reward.name}; use a preset with reward.name: distribution (e.g. "
                          f"{DISTRIBUTION_PRESET} or fmnist_pathwise); --compare adds the sample-wise baseline")
    sample_cfg = with_sample_reward(cfg)
    if sample_overrides:
        sample_cfg = resolve(OmegaConf.merge(sample_cfg, OmegaConf.from_dotlist(list(sample_overrides))))
    return DemoContext(run_dir=Path(run_dir), cfg=cfg, sample_cfg=sample_cfg, compare=compare, progress=progress,
                       _evaluator=evaluator, eval_cache_setting=eval_cache)


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


STAGES_FILE = "stages.json"     # <run_dir>/stages.json: {stage: {"digest", "key", "done"}}


def default_key(ctx: DemoContext) -> dict:
    """The key of a stage without its own: both fine-tuning configs, --compare, the base model, the evaluator and the
    digests of every stage before it."""
    return {"cfg": plain_config(ctx.cfg), "sample_cfg": plain_config(ctx.sample_cfg), "compare": ctx.compare,
            "base": ctx.base_sha256(), "evaluator": ctx.evaluator_key, "earlier": dict(ctx.digests)}


def key_digest(key: Any) -> str:
    return hashlib.sha256(json.dumps(plain_config(key), sort_keys=True).encode()).hexdigest()


def run_stages(ctx: DemoContext, stages: list[Stage], keys: Mapping[str, Callable[[DemoContext], Any]] | None = None) -> None:
    """Run each stage in order into ctx.results. A stage whose stage.json was computed from the same key (recorded
    in stages.json) is reused; one whose key changed is run again from a clean directory (`ctx.clean`), naming
    what changed; one started with the same key but not finished resumes; `ctx.fresh` runs every stage afresh.
    `keys`: key functions by stage name (the built-in stages'), else the stage's own `key`, else `default_key`."""
    registry_path = ctx.run_dir / STAGES_FILE
    try:
        registry = json.loads(registry_path.read_text()) if registry_path.is_file() else {}
    except ValueError:
        registry = {}
    for s in stages:
        key = plain_config((s.key or (keys or {}).get(s.name) or default_key)(ctx))
        digest = key_digest(key)
        rec = registry.get(s.name) or {}
        done = ctx.run_dir / s.name / "stage.json"
        same = rec.get("digest") == digest and not ctx.fresh
        if same and rec.get("done") and done.is_file():
            ctx.results[s.name] = json.loads(done.read_text())
            ctx.digests[s.name] = digest
            print(f"[demo] {s.name}: done before with the same settings, reusing {done}")
            continue
        if rec and not same and not ctx.fresh:
            what = list(changed_keys(rec.get("key") or {}, key)) or ["its key"]
            print(f"[demo] {s.name}: settings changed since it ran ({', '.join(what[:6])}"
                  f"{' ...' if len(what) > 6 else ''}); running it again from a clean directory")
        elif done.is_file() and not rec and not ctx.fresh:
            print(f"[demo] {s.name}: {done} has no recorded settings; running it again from a clean directory")
        ctx.clean = not same
        registry[s.name] = {"digest": digest, "key": key, "done": False}
        atomic_save_json(registry_path, registry)
        print(f"[demo] stage {s.name} ..." + ("" if ctx.clean else " (resuming)"))
        ts = time.perf_counter()
        try:
            result = s.fn(ctx)
        finally:
            ctx.clean = False
        result["seconds"] = round(time.perf_counter() - ts, 1)
        ctx.results[s.name] = result
        ctx.digests[s.name] = digest
        atomic_save_json(ctx.stage_dir(s.name) / "stage.json", result)
        registry[s.name]["done"] = True
        atomic_save_json(registry_path, registry)
