"""RL over post-hoc merging coefficients (METHOD.md §5).

- `CheckpointSet`: K .safetensors checkpoints merged as theta(w) = sum_k w_k theta_k, streamed tensor by tensor;
  with per-block coefficients (`merge.space: blocks`) each block group of `blocks` has its own row of w.
- `GaussianPolicy` + `policy_update`: the diagonal Gaussian policy over w, PPO-clip or REINFORCE with Adam.
- `search`: the searchers behind one ask/tell interface (rl.algorithm: ppo, reinforce, cma, random; CMA-ES in
  `cmaes`, imported only when asked for); `soup`: the greedy soup baseline.
- `inputs`: checkpoint lists, post-hoc EMA coefficients, EDM2 pickle conversion and `merge_parts`, the one builder
  of a run's parts from its config (inputs, ODE sampler with guidance and decoding, reward features with their
  weights, real statistics, evaluator).
- `candidates`: a candidate from its drawn coefficients to its reward: the coefficient space (`as_merged`), the
  samples and features of merged models over the ranks (`CandidateSampler`), the set-replace FD reward
  (`SetReward`: r_c = FD(G) - FD(G - S + X_c) for a candidate's n samples X_c, `reward.ReferenceSet.set_rewards`).
- `baselines`: held-out evaluations of theta(w) and the baselines (last, uniform, post-hoc EMA grid, greedy soup);
  `state`: the checkpoint of a search and the run's outputs.
- `run_merge(cfg, run_dir)` (`trainer`): the baselines, the search loop (`MergeRL`), the merged model.
- `study.run_merge_study`: every searcher at the same image budget over seeds against the baselines, reported with
  the evidence protocol (`distreward merge-study`).
"""

from ..sampling.generate import shared_noise
from .blocks import GROUPS, block_groups
from .inputs import merge_parts, open_checkpoints
from .policy import GaussianPolicy, normalise_rewards, policy_update, ppo_clip_loss, project_sum_one, reinforce_loss
from .search import SEARCHERS, PolicySearch, RandomSearch, make_searcher
from .soup import greedy_soup, soup_weights
from .streaming import CheckpointSet, list_snapshots, weighted_sum
from .trainer import DEFAULTS, MergeRL, resolve, run_merge

__all__ = ["CheckpointSet", "GaussianPolicy", "GROUPS", "MergeRL", "DEFAULTS", "PolicySearch", "RandomSearch",
           "SEARCHERS", "block_groups", "greedy_soup", "list_snapshots", "make_searcher", "merge_parts", "normalise_rewards",
           "open_checkpoints", "policy_update", "ppo_clip_loss", "project_sum_one", "reinforce_loss", "resolve",
           "run_merge", "shared_noise", "soup_weights", "weighted_sum"]

