"""Greedy soup (Wortsman et al. 2022, "Model soups"): the `greedy_soup` baseline of `distreward merge`.

The inputs are sorted by their own validation score (lower is better: `merge.baselines.SELECT_BY`); the soup starts
as the best single input and each next input is added to it (the soup is the uniform average of its inputs) only
when the soup with it scores lower than the soup without.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def greedy_soup(scores: Sequence[float], soup_score: Callable[[list[int]], float]) -> dict:
    """The greedy soup from each input's own score (`scores[i]`, lower is better) and `soup_score(inputs)`, the score
    of the uniform average of those inputs. Returns {inputs (chosen, in the order added), order, score, trials:
    [{input, score, added}]}."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    chosen, best = [order[0]], float(scores[order[0]])
    trials = []
    for i in order[1:]:
        s = float(soup_score(chosen + [i]))
        added = s < best
        trials.append({"input": i, "score": s, "added": added})
        if added:
            chosen, best = chosen + [i], s
    return {"inputs": chosen, "order": order, "score": best, "trials": trials}


# The soup's coefficients: 1/|S| on each chosen input, 0 elsewhere.
def soup_weights(inputs: Sequence[int], k: int) -> np.ndarray:
    w = np.zeros(k)
    w[list(inputs)] = 1.0 / len(inputs)
    return w
