"""distreward: RL fine-tuning of image generators with distribution-wise rewards.

Packages, one per concern (data flows left to right):
data -> features -> metrics -> reward -> rl -> merge, with models/sampling feeding the rollouts
and train producing base models and EMA snapshots.
"""

__version__ = "0.1.0"
