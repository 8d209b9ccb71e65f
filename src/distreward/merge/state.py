"""What a merge run keeps: the search state of its checkpoint (searcher, reference set, RNG, iteration, history),
restored by --resume, and its outputs (coefficients.json, merged.safetensors, result.json)."""

from __future__ import annotations

import json

from ..utils.checkpoint import rng_state, set_rng_state
from ..utils.io import RunDir, atomic_save_json


def search_state(rl) -> dict:
    """The checkpoint of a `trainer.MergeRL`: the searcher's state and name, the reference set, the searcher's
    RNG, the iteration and the history."""
    return {**rl.searcher.state_dict(), "searcher": rl.searcher.name, "reward": rl.scorer.state_dict(),
            "rng": rng_state(rl.searcher.generator), "iteration": rl.iteration, "history": json.dumps(rl.history)}


def load_search_state(rl, st: dict) -> None:
    """`search_state` back into `rl`; a checkpoint of another searcher is refused."""
    saved = st.get("searcher", rl.searcher.name)     # checkpoints before the searchers: ppo or reinforce
    if saved != rl.searcher.name:
        raise ValueError(f"the checkpoint is of the {saved!r} searcher, the config asks for "
                         f"rl.algorithm={rl.searcher.name!r}; resume with rl.algorithm={saved}")
    rl.searcher.load_state_dict(st)
    rl.scorer.load_state_dict(st["reward"])
    set_rng_state(rl.searcher.generator, st["rng"])
    rl.iteration = int(st["iteration"])
    rl.history = json.loads(st["history"])


def save_outputs(run: RunDir, rl, result: dict, init) -> None:
    """coefficients.json (the merged weights, their std, the inputs, the initial mean), merged.safetensors (a
    generator file for every command) and result.json."""
    w, searcher = rl.mean_weights(), rl.searcher.name
    atomic_save_json(run.path("coefficients.json"), {"weights": w.tolist(), "searcher": searcher,
                                                      "space": str(rl.cfg.merge.get("space", "global")),
                                                      "checkpoints": result["checkpoints"],
                                                      "std": rl.searcher.std().numpy().reshape(w.shape).tolist(),
                                                      "iterations": rl.iteration, "init": init.tolist()})
    rl.ckpts.save(run.path("merged.safetensors"), w, extra={"merge_run": str(run.root), "iterations": rl.iteration,
                                                            "searcher": searcher})
    atomic_save_json(run.path("result.json"), result)

