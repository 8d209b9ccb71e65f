"""Processes and samplers in the SD3 flow convention (METHOD.md §4; docs/sampling.md).

x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0, sigma from 1 (noise) to 0 (data). Every generator is wrapped
by a velocity adapter (`FlowVelocity`, `SiTVelocity`, `EDMVelocity`, `CFGVelocity`) into `v = model(x, sigma, labels)`.
"""

from .adapters import (CFGVelocity, EDMVelocity, FlowVelocity, SiTVelocity, cfg_combine, edm_class_labels, flow_velocity_from_x0,
                       edm_to_flow_velocity, flow_to_edm_x, flow_to_sit_time, sigma_vector, sit_to_flow_velocity, velocity_model)
from .analytic import GaussianDenoiser, GaussianVelocity
from .samplers import (STEPS, Trajectory, edm_sample, heun_correct, noise_levels, ode_sample, ode_step, rollout,
                       sit_sde_sample, step_log_prob)
from .schedules import (check_sigmas, edm_flow_sigmas, edm_sigmas, edm_to_flow_sigma, flow_to_edm_sigma,
                        sigma_schedule, time_shift)
from .steps import (StepOutput, cps_step, ddim_step, euler_step, gaussian_log_prob, randn_like, sde_step)

__all__ = [
    "CFGVelocity", "EDMVelocity", "FlowVelocity", "SiTVelocity", "StepOutput", "Trajectory", "STEPS",
    "cfg_combine", "check_sigmas", "cps_step", "ddim_step", "edm_class_labels", "edm_flow_sigmas", "edm_sample",
    "edm_sigmas", "edm_to_flow_sigma", "edm_to_flow_velocity", "euler_step", "flow_to_edm_sigma", "flow_to_edm_x",
    "flow_to_sit_time", "flow_velocity_from_x0", "GaussianDenoiser", "gaussian_log_prob", "GaussianVelocity", "heun_correct",
    "noise_levels", "ode_sample", "ode_step", "randn_like", "rollout", "sde_step", "sigma_schedule", "sigma_vector",
    "sit_sde_sample", "sit_to_flow_velocity", "step_log_prob", "time_shift", "velocity_model",
]
