"""Distribution-wise (subset-replace FD) and sample-wise rewards behind one interface (METHOD.md §3, §6).

`ReferenceSet` holds the generated features and scores candidates ("fast" exact by default, "exact" brute force,
"linear" first order); `DistributionReward` wraps it with a feature network, `ClassDistributionReward` keeps one per
class; `ClassifierLogProbReward` and
`KNNRealismReward` are the sample-wise baselines; `build_reward(cfg, device=...)` makes any of them from a config.
"""

from .reference import ReferenceSet, plain_set_rewards
from .rewards import (ClassDistributionReward, ClassifierLogProbReward, DistributionReward, KNNRealismReward, Reward,
                      build_reward)

__all__ = ["ReferenceSet", "plain_set_rewards", "Reward", "DistributionReward", "ClassDistributionReward",
           "ClassifierLogProbReward",
           "KNNRealismReward", "build_reward"]
