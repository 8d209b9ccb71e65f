"""Base training of generators: flow matching with power-function EMA snapshots and post-hoc EMA (EDM2)."""

from .ema import PowerEMA, gamma_to_sigma_rel, power_beta, power_weights, sigma_rel_to_gamma
from .flow import flow_interpolate, flow_loss, flow_target, learning_rate, sample_sigma
from .loop import DEFAULTS, train_base
from .phema import (Snapshot, list_snapshots, phema_coefficients, profile_inner, reconstruct, save_phema,
                    solve_phema_coefficients)

__all__ = [
    "PowerEMA", "gamma_to_sigma_rel", "power_beta", "power_weights", "sigma_rel_to_gamma",
    "flow_interpolate", "flow_loss", "flow_target", "learning_rate", "sample_sigma",
    "DEFAULTS", "train_base",
    "Snapshot", "list_snapshots", "phema_coefficients", "profile_inner", "reconstruct", "save_phema",
    "solve_phema_coefficients",
]
