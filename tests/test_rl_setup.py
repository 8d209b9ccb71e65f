"""The reward of a GRPO run and its reference set (rl/setup.py): the cached initial reference set is recomputed
when what it was built from changes."""

from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

from distreward.utils.threads import set_threads

set_threads()   # $DISTREWARD_THREADS (1 in the project's test runs)

from distreward.rl.settings import resolve  # noqa: E402

from _unet32 import grpo_cfg, tiny_unet  # noqa: E402


def test_reference_cache_is_recomputed_when_its_settings_change(tmp_path, monkeypatch):
    """The initial reference set (base_reference_features.npy) is reused under the same settings only: a changed
    reward.reference_size or seed draws it again."""
    from distreward.rl import setup
    from distreward.sampling import velocity_model

    net = tiny_unet().eval()
    model = velocity_model(net, "unet")
    calls = []
    real = setup.reference_features

    def counting(*args, **kwargs):
        calls.append(args[3].n)
        return real(*args, **kwargs)

    monkeypatch.setattr(setup, "reference_features", counting)

    def build(**over):
        cfg = resolve({**grpo_cfg(), "device": "cpu", **{k: v for k, v in over.items() if k == "seed"},
                       "reward": {"name": "distribution", "features": "random", "reference_size": over.get("n", 12)}})
        sampler = setup.ReferenceSampler.of_run(cfg, int(cfg.reward.reference_size))
        setup.build_reward_for_run(OmegaConf.to_container(cfg.reward), sampler, net, tmp_path, model=model,
                                   decode=lambda x: x.clamp(-1, 1))
        return np.load(tmp_path / setup.REFERENCE_CACHE)

    first = build()
    again = build()
    assert calls == [12] and np.array_equal(first, again)               # same settings: the cache
    assert build(n=10).shape[0] == 10 and calls == [12, 10]             # another N: drawn again
    other_seed = build(n=10, seed=1)
    assert calls == [12, 10, 10] and not np.array_equal(other_seed, first[:10])
