"""Evaluation: an image set against the real data (`Evaluator`), and a generator through its sampler (`generator`).

    ev = Evaluator.for_fmnist()                      # Fashion-MNIST train as the reference, both embedded networks
    ev.evaluate(images)                              # {'fd_reward', 'fd_eval', 'kid', 'kid_std', 'precision', 'recall', 'n'}
    evaluate_generator(net, ev, EvalPlan(n=2000, seed=1234))   # samples, then the same metrics (sharded under torchrun)
"""

from .evaluator import (DEFAULT_CACHE, KID_SCALE, Evaluator, fit_images, format_metrics, gaussian_kernel1d, images_hash,
                        network_hash, perturb_images, sample_rows)
from .generator import EvalPlan, evaluate_generator, evaluator_network, fd_from_stats, sharded_metrics

__all__ = ["DEFAULT_CACHE", "KID_SCALE", "EvalPlan", "Evaluator", "evaluate_generator", "evaluator_network",
           "fd_from_stats", "fit_images", "format_metrics", "gaussian_kernel1d", "images_hash", "network_hash",
           "perturb_images", "sample_rows", "sharded_metrics"]
