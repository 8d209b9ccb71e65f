"""The main job (`make demo`): base model -> RL fine-tuning with the distribution-wise reward (the fmnist_nft
preset's forward-process trainer, or another preset's; -> the sample-wise baseline with the same trainer) -> RL merging ->
evidence (every model at the served, a converged and a training-free solver, on a fresh seed) -> report.

`run_demo` runs the stages of BUILTIN_STAGES, then the registered ones. Each stage writes its result to
<run_dir>/<stage>/stage.json when it finishes, so re-running the demo skips finished stages computed from the same
settings (a stage's key, STAGE_KEYS, recorded in <run_dir>/stages.json), reruns from a clean directory a stage
whose settings changed, and resumes a killed stage started with the same settings (docs/runs.md). The demo holds
the lock of <run_dir> while it runs and appends its invocation to <run_dir>/provenance.json. The report (report.md, metrics.json) is rebuilt from the stage results every
time.

    from distreward import demo
    demo.run_demo("runs/demo", compare=True, overrides=["rl.iterations=10"])

More stages: `register_stage(Stage("my_stage", fn, enabled=..., section=...))` adds a stage that runs after the
built-in ones; `fn(ctx) -> dict` gets the `DemoContext` (run directory, configs, evaluator, base model, earlier
results); its result becomes a row of the table and a key of metrics.json, and an optional
`section(result, ctx) -> markdown` adds its own part of the report.

Modules: stages.py (Stage, DemoContext, running stages, register_stage), finetune.py (base, distribution, sample,
crosscheck), merge.py (merge_ema, merge_rl), evidence.py (the evidence protocol's rows), report.py (report.md,
metrics.json).
"""

from __future__ import annotations

import json
import time

from ..config import find_file
from ..utils.configdiff import plain_config
from ..utils.hashing import hash_inputs
from ..utils.lock import RunLock
from ..utils.provenance import append_provenance, provenance_entry
from ..utils.threads import set_threads
from .finetune import (base_key, classifier_logp, crosscheck_key, crosscheck_section, crosscheck_steps,
                       evaluate_model, finetune_key, stage_base, stage_crosscheck, stage_distribution, stage_sample)
from .evidence import evidence_key, stage_evidence
from .merge import (check_merge_configs, has_snapshots, merge_ema_key, merge_ema_section, merge_rl_key,
                    merge_rl_section, stage_merge_ema, stage_merge_rl)
from .report import write_report
from .stages import (DISTRIBUTION_PRESET, EXTRA_STAGES, METRIC_KEYS, DemoContext, Stage, make_context,
                     register_stage, run_stages, with_extra_stages)

# The demo's stages, in order (a stage that is not enabled is skipped).
BUILTIN_STAGES = [
    Stage("base", stage_base),
    Stage("distribution", stage_distribution),
    Stage("sample", stage_sample, enabled=lambda ctx: ctx.compare),
    Stage("crosscheck", stage_crosscheck, enabled=lambda ctx: crosscheck_steps(ctx) is not None,
          section=crosscheck_section, row=False),
    Stage("merge_ema", stage_merge_ema, enabled=has_snapshots, section=merge_ema_section),
    Stage("merge_rl", stage_merge_rl, section=merge_rl_section),
    Stage("evidence", stage_evidence, row=False),
]
# What each built-in stage's result depends on (by name, so a stage replaced in BUILTIN_STAGES keeps its key).
STAGE_KEYS = {"base": base_key, "distribution": finetune_key("cfg"), "sample": finetune_key("sample_cfg"),
              "crosscheck": crosscheck_key, "merge_ema": merge_ema_key, "merge_rl": merge_rl_key,
              "evidence": evidence_key}


def run_demo(run_dir="runs/demo", *, compare: bool = False, threads: int | None = None, overrides=(),
             fresh: bool = False, progress: bool = True, evaluator=None, eval_cache="auto",
             preset: str = DISTRIBUTION_PRESET) -> dict:
    """Run (or finish) the demo; returns metrics.json's content. `preset`: the distribution-wise fine-tuning preset
    (default DISTRIBUTION_PRESET); `overrides`: key=value for the fine-tuning config (both runs);
    `compare`: also the sample-wise baseline; `fresh`: run every stage again; `evaluator`: instead of the
    Fashion-MNIST one; `eval_cache`: where the model evaluations (base, cross-check, merge baselines) are cached
    across demos ("auto": <evaluator cache_dir>/evals, i.e. runs/.cache/evals; a folder; None: off). The cache
    never changes a number: metrics.json and the report are the same with and without it."""
    if threads is not None:
        set_threads(threads)
    t0 = time.perf_counter()
    ctx = make_context(run_dir, compare=compare, overrides=overrides, progress=progress, evaluator=evaluator,
                       eval_cache=eval_cache, preset=preset)
    check_merge_configs(ctx)        # every config is checked before the first stage (the fine-tuning ones by make_context)
    ctx.fresh = fresh
    with RunLock(ctx.run_dir, "demo"):      # one demo per run directory at a time
        append_provenance(ctx.run_dir, provenance_entry(
            "demo", ctx.cfg, inputs=hash_inputs([find_file(ctx.cfg.model.path)]), compare=compare, fresh=fresh,
            preset=preset, overrides=list(overrides), config=plain_config(ctx.cfg),
            sample_config=plain_config(ctx.sample_cfg)))
        selected = [s for s in with_extra_stages(BUILTIN_STAGES) if s.enabled(ctx)]
        extra = {s.name for s in with_extra_stages([])}          # the registered stages use their own keys
        keys = {n: f for n, f in STAGE_KEYS.items() if n in {s.name for s in BUILTIN_STAGES} - extra}
        run_stages(ctx, selected, keys)
        write_report(ctx, selected, time.perf_counter() - t0)
    print(f"[demo] report: {ctx.run_dir / 'report.md'}")
    return json.loads((ctx.run_dir / "metrics.json").read_text())


__all__ = ["BUILTIN_STAGES", "DISTRIBUTION_PRESET", "EXTRA_STAGES", "METRIC_KEYS", "STAGE_KEYS",
           "DemoContext", "Stage",
           "classifier_logp", "crosscheck_steps", "evaluate_model", "make_context", "register_stage", "run_demo",
           "run_stages", "write_report"]
