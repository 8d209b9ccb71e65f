"""Evaluation: an image set against the real data (`Evaluator`), and a generator through its sampler (`generator`).

    ev = Evaluator.for_fmnist()                      # Fashion-MNIST train as the reference, both embedded networks
    ev.evaluate(images)                              # {'fd_reward', 'fd_eval', 'kid', 'kid_std', 'precision', 'recall',
                                                     #  'density', 'coverage', 'n'}
    evaluate_generator(net, ev, EvalPlan(n=2000, seed=1234))   # samples, then the same metrics (sharded under torchrun)
    evaluate_solvers(net, ev, plan, {"euler": spec1, "heun": spec2})   # several solvers on the same noise and labels
    evaluate_generator(net, ev, plan, cache=EvalCache())   # stored once (in the user cache folder), reused by key
"""

from .cache import (DEFAULT_EVAL_CACHE, CachedEval, EvalCache, ImageFigures, cached_evaluation, code_digest,
                    default_eval_cache, eval_cache_for, eval_key, generator_key)
from .evaluator import (DEFAULT_CACHE, KID_SCALE, Evaluator, fit_images, format_metrics, gaussian_kernel1d, images_hash,
                        evaluator_key, network_hash, perturb_images, sample_rows)
from .generator import (EvalPlan, converged_steps, evaluate_generator, evaluate_solvers, evaluator_network,
                        evidence_metrics, fd_from_stats, heun_for_nfe, nfe, score_generator, sharded_evaluation,
                        sharded_metrics)

__all__ = ["DEFAULT_CACHE", "DEFAULT_EVAL_CACHE", "KID_SCALE", "CachedEval", "EvalCache", "EvalPlan", "Evaluator",
           "ImageFigures", "cached_evaluation", "code_digest", "converged_steps", "default_eval_cache", "eval_cache_for", "eval_key",
           "evaluate_generator", "evaluate_solvers", "evaluator_key", "evaluator_network", "evidence_metrics",
           "fd_from_stats", "fit_images", "format_metrics", "gaussian_kernel1d", "generator_key", "heun_for_nfe",
           "images_hash", "network_hash", "nfe", "perturb_images", "sample_rows", "score_generator",
           "sharded_evaluation", "sharded_metrics"]
