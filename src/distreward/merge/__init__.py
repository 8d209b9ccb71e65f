"""RL over post-hoc merging coefficients (METHOD.md §5).

- `CheckpointSet`: K .safetensors checkpoints merged as theta(w) = sum_k w_k theta_k, streamed tensor by tensor.
- `GaussianPolicy` + `policy_update`: the diagonal Gaussian policy over w, PPO-clip or REINFORCE with Adam.
- `SetReplaceReward`: r_c = FD(G) - FD(G - S + X_c), the distribution-wise reward of a candidate's n samples.
- `run_merge(cfg, run_dir)`: baselines (last, uniform, post-hoc EMA grid), the RL loop, the merged model.
- `demo_stages(...)`: the `merge_ema` / `merge_rl` sections of the demo report.
"""

from .policy import GaussianPolicy, normalise_rewards, policy_update, ppo_clip_loss, project_sum_one, reinforce_loss
from .reward import SetReplaceReward
from .streaming import CheckpointSet, list_snapshots, weighted_sum
from .trainer import DEFAULTS, MergeRL, run_merge, shared_noise

__all__ = ["CheckpointSet", "GaussianPolicy", "MergeRL", "SetReplaceReward", "DEFAULTS", "demo_stages", "list_snapshots",
           "normalise_rewards", "policy_update", "ppo_clip_loss", "project_sum_one", "reinforce_loss", "run_merge",
           "shared_noise", "weighted_sum"]


def demo_stages(*args, **kwargs):
    """See `distreward.merge.demo.demo_stages`."""
    from .demo import demo_stages as _demo_stages

    return _demo_stages(*args, **kwargs)
