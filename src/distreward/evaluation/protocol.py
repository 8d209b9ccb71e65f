"""The evidence protocol: how a set of models is reported so that a gain survives a reviewer's controls.

Every model is evaluated on the same noise and labels (a seed) with three solvers:
  served         the sampler the model is served with (what RL trained for);
  converged      Heun with enough steps that doubling them moves FD by less than its standard error (searched on
                 the validation seed, `find_converged_steps`): is the model itself better, or only its sampler?
  training_free  Heun at the served sampler's cost (NFE): what a better solver gives without any training.
Each FD carries a bootstrap standard error (`fd_*_err`), per-class FD (mean, worst class) and, with a second
evaluator (Fashion-MNIST test), the same FDs against that split (`fd_*_test`). Seeds: anything chosen by looking
at numbers uses `validation_seed`; reported numbers use `report_seed`, used for nothing else (docs/metrics.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

import numpy as np

from ..config import plain
from ..sampling.generate import SamplerSpec
from ..schema import validate
from .cache import EvalCache, ImageFigures
from .evaluator import Evaluator, evaluator_key
from .generator import EvalPlan, converged_steps, evaluate_generator, evidence_metrics, heun_for_nfe, net_keys, nfe

SOLVERS = ("served", "converged", "training_free")
TEST_SUFFIX = "_test"       # the keys of the FDs against Fashion-MNIST test: fd_reward_test, fd_eval_test
ROW_KEYS = ("fd_reward", "fd_reward_err", "fd_eval", "fd_eval_err", "fd_reward_boot", "fd_eval_boot",
            "precision", "recall", "density", "coverage",
            "kid", "n",
            "fd_reward_class_mean", "fd_reward_class_worst", "fd_eval_class_mean", "fd_eval_class_worst",
            "fd_reward_test", "fd_reward_test_err", "fd_eval_test", "fd_eval_test_err", "classifier_logp")


@dataclass(frozen=True)
class Protocol:
    """The evidence settings of a config (the `evidence` section; schema Evidence, where their defaults live)."""
    served: SamplerSpec
    validation_seed: int
    report_seed: int
    n: int
    uncertainty: int
    converged_steps: int | None
    search_n: int
    search_start: int
    search_max: int
    curve_n: int
    curve_nfe: tuple
    test_split: bool = True

    @classmethod
    def of(cls, evidence: Mapping | None, served: SamplerSpec, n: int) -> "Protocol":
        """The protocol of an `evidence` section (checked and completed by the schema); `n`: the evaluation's own
        sample count, used when evidence.n is null."""
        e = evidence_settings(evidence)
        return cls(served=served, validation_seed=e["validation_seed"], report_seed=e["report_seed"],
                   n=int(e["n"] or n), uncertainty=e["uncertainty"], converged_steps=e["converged_steps"],
                   search_n=e["search_n"], search_start=e["search_start"], search_max=e["search_max"],
                   curve_n=e["curve_n"], curve_nfe=tuple(e["curve_nfe"]), test_split=bool(e["test_split"]))

    def report_plan(self, plan: EvalPlan, evaluator) -> EvalPlan:
        """`plan` on the report seed with the protocol's n and bootstrap resamples, and per-class FD when the
        evaluator has per-class real statistics."""
        per_class = any(c is not None for c in getattr(evaluator, "real_class_stats", None) or [])
        return replace(plan, n=self.n, seed=self.report_seed, uncertainty=self.uncertainty, per_class=per_class)

    def validation_plan(self, plan: EvalPlan, n: int | None = None) -> EvalPlan:
        """`plan` on the validation seed (what settings are chosen on): `n` samples (default search_n) with the
        protocol's bootstrap resamples, FD on the finite set, no per-class figures."""
        return replace(plan, n=int(n or self.search_n), seed=self.validation_seed, uncertainty=self.uncertainty,
                       fd_infinity=False, per_class=False)

    def test_figures(self, evaluator, device="cpu") -> ImageFigures | None:
        """FD of the report's images against Fashion-MNIST test (keys fd_reward_test, fd_eval_test and their
        _err; `split_figures`), when the evaluator is the Fashion-MNIST train one and test_split is on; else
        None."""
        split = test_evaluator(evaluator, self.test_split, device)
        return None if split is None else split_figures(split, TEST_SUFFIX, self.uncertainty, self.report_seed)

    def solvers(self, converged_steps: int) -> dict[str, SamplerSpec]:
        """The three solvers: served, Heun at `converged_steps`, Heun at the served NFE."""
        return {"served": self.served,
                "converged": replace(self.served, kind="ode", method="heun", steps=int(converged_steps)),
                "training_free": heun_for_nfe(nfe(self.served), self.served)}


def evidence_settings(evidence: Mapping | None) -> dict:
    """An `evidence` section (None, a partial mapping or a validated one) checked by the schema and completed with
    its defaults, as plain values: unknown keys, wrong types and disallowed values raise a `ConfigError`."""
    return plain(validate("finetune", {"evidence": plain(evidence or {})}).evidence)


def find_converged_steps(net, evaluator, plan: EvalPlan, protocol: Protocol, *, arch: str = "unet", device="cpu",
                         progress: bool = False, cache: EvalCache | None = None) -> dict:
    """The converged Heun step count of `net` on the validation seed (protocol.search_n samples): the settings'
    count if given, else `converged_steps`' search. Returns {"steps", "searched", "trace"}; steps falls back to
    search_max (with converged False in the trace) when no doubling settled within it."""
    if protocol.converged_steps:
        return {"steps": int(protocol.converged_steps), "searched": False, "trace": []}
    steps, trace = converged_steps(net, evaluator, protocol.validation_plan(plan), "heun", protocol.search_start,
                                   protocol.search_max, arch=arch, device=device, progress=progress, cache=cache)
    return {"steps": int(steps) if steps is not None else int(protocol.search_max), "searched": True,
            "trace": trace}


def test_evaluator(evaluator, on: bool = True, device="cpu"):
    """Fashion-MNIST test as a second reference (the same feature networks), when `evaluator` is the Fashion-MNIST
    train one and `on` (evidence.test_split); else None."""
    if not on or getattr(evaluator, "split", None) != "train":
        return None
    return Evaluator.for_fmnist(device=device, split="test")


def split_figures(evaluator, suffix: str, uncertainty: int, seed: int) -> ImageFigures:
    """FD of the evaluation images against another evaluator's real data (e.g. Fashion-MNIST test), with
    bootstrap errors: keys fd_reward<suffix>, fd_reward<suffix>_err (same for fd_eval)."""
    key = {"split": evaluator_key(evaluator), "suffix": suffix, "uncertainty": int(uncertainty), "seed": int(seed)}

    def fn(images) -> dict:
        feats = evaluator.features(images)
        fds = evaluator.frechet_distances(feats)
        errs = evidence_metrics(evaluator, feats, None, uncertainty=uncertainty, seed=seed)["fd_err"]
        out = {}
        for label, name in zip(evaluator.labels, net_keys(evaluator)):
            out[f"{name}{suffix}"], out[f"{name}{suffix}_err"] = fds[label], errs[label]
        return out
    return ImageFigures(key, fn)


def combined_figures(*figures: ImageFigures | None) -> ImageFigures | None:
    """Several ImageFigures as one (keys and values merged, in order)."""
    figs = [f for f in figures if f is not None]
    if not figs:
        return None
    return ImageFigures([f.key for f in figs], lambda images: {k: v for f in figs for k, v in f.fn(images).items()})


def report_row(metrics: Mapping, solver: SamplerSpec) -> dict:
    """The row of a model in a report: ROW_KEYS present in its metrics, plus the solver's method, steps, NFE."""
    row = {k: metrics[k] for k in ROW_KEYS if metrics.get(k) is not None}
    return {**row, "method": solver.method, "steps": int(solver.steps), "nfe": nfe(solver)}


def evaluate_models(models: Mapping[str, object], evaluator, plan: EvalPlan, solvers: Mapping[str, SamplerSpec], *,
                    arch: str = "unet", device="cpu", progress: bool = False, cache: EvalCache | None = None,
                    figures: ImageFigures | None = None,
                    on_model: Callable[[str, str, dict], None] | None = None) -> dict[str, dict[str, dict]]:
    """{solver: {model: row}}: every model with every solver on the plan's noise and labels (paired: row i of two
    models comes from the same noise and label), with the plan's evidence (uncertainty, per-class FD) and
    `figures` (e.g. `split_figures` of the test split). `on_model(solver, model, row)` is called after each."""
    out: dict[str, dict[str, dict]] = {s: {} for s in solvers}
    for mname, net in models.items():
        for sname, spec in solvers.items():
            m, _ = evaluate_generator(net, evaluator, replace(plan, sampler=spec), arch=arch, device=device,
                                      progress=progress, desc=f"{mname} {sname} ({spec.method} {spec.steps})",
                                      cache=cache, figures=figures)
            out[sname][mname] = report_row(m, spec)
            if on_model is not None:
                on_model(sname, mname, out[sname][mname])
    return out


def fd_vs_nfe(models: Mapping[str, object], evaluator, plan: EvalPlan, nfes, *, arch: str = "unet", device="cpu",
              progress: bool = False, cache: EvalCache | None = None) -> list[dict]:
    """FD of every model with Euler and with Heun at about each NFE in `nfes` (Heun: the most steps within it):
    rows {model, method, steps, nfe, fd_reward, fd_eval}. The picture that answers "better model or better
    sampler"."""
    rows = []
    base = plan.sampler
    for mname, net in models.items():
        for budget in nfes:
            for spec in (replace(base, kind="ode", method="euler", steps=int(budget)), heun_for_nfe(int(budget), base)):
                m, _ = evaluate_generator(net, evaluator, replace(plan, sampler=spec), arch=arch, device=device,
                                          progress=progress, desc=f"{mname} {spec.method} {spec.steps}", cache=cache)
                rows.append({"model": mname, "method": spec.method, "steps": int(spec.steps), "nfe": nfe(spec),
                             "fd_reward": m.get("fd_reward"), "fd_eval": m.get("fd_eval")})
    return rows


def paired_difference(row: Mapping, ref: Mapping, key: str = "fd_eval") -> tuple[float, float] | None:
    """(row[key] - ref[key], its paired standard error) of two rows of one evaluation plan (the same noise, labels
    and bootstrap resamples: two models or two solvers of one table): the std of the replicate-by-replicate
    differences `<key>_boot`, in which the draw of noise both rows share cancels. None without replicates."""
    a, b = row.get(f"{key}_boot"), ref.get(f"{key}_boot")
    if a is None or b is None or len(a) != len(b) or row.get("n") != ref.get("n"):
        return None
    return float(row[key] - ref[key]), float(np.std(np.asarray(a) - np.asarray(b), ddof=1))


def relative_gain(row: Mapping, base: Mapping, key: str) -> tuple[float, float] | None:
    """(FD_model / FD_base - 1, its standard error) of metric `key` for two rows of one plan: the paired error
    (`paired_difference`) when both rows carry their bootstrap replicates, else from both rows' errors treated as
    independent (an upper bound for paired rows); None when a value or error is missing."""
    a, b = row.get(key), base.get(key)
    ea, eb = row.get(f"{key}_err"), base.get(f"{key}_err")
    if None in (a, b, ea, eb) or not b:
        return None
    paired = paired_difference(row, base, key)
    if paired is not None:
        return a / b - 1.0, paired[1] / b
    ratio = a / b
    return ratio - 1.0, ratio * ((ea / a) ** 2 + (eb / b) ** 2) ** 0.5 if a else float("nan")
