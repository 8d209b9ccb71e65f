"""Block groups of a generator's tensors, for per-block merging coefficients (`merge.space: blocks`).

With per-block coefficients the merge is theta_g(W) = sum_k W[g, k] theta_k for the tensors of group g: the input
blocks (the embeddings and the encoder), the middle blocks (the lowest resolution, or the middle third of a
transformer's blocks) and the output blocks (the decoder and the output layer) each get their own K coefficients.
A merge can then take, say, a longer EMA for the encoder and a shorter one for the decoder.
"""

from __future__ import annotations

import re
from typing import Iterable

GROUPS = ("input", "middle", "output")

# Tensor-name patterns of each group, by architecture (matched at the start of the name; EDM2's under `unet.`).
UNET_PATTERNS = {"input": r"(conv_in|map_sigma|map_label|enc)\.", "middle": r"mid\.",
                 "output": r"(dec|norm_out|conv_out)\."}
EDM2_PATTERNS = {"input": r"(unet\.)?(emb_|enc\.)|logvar_", "middle": r"(unet\.)?dec\.\d+x\d+_in\d",
                 "output": r"(unet\.)?(dec\.|out_conv|out_gain)"}
SIT_EMBEDDERS = r"(x_embedder|t_embedder|y_embedder|pos_embed)"


def sit_group(name: str, depth: int) -> int | None:
    """SiT: the embedders and the first third of the blocks are input, the middle third middle, the rest and the
    final layer output."""
    if re.match(SIT_EMBEDDERS, name):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return min(2, int(m.group(1)) * 3 // max(depth, 1))
    return 2 if name.startswith("final_layer.") else None


def pattern_group(name: str, patterns: dict[str, str]) -> int | None:
    for g, group in enumerate(GROUPS):       # the first group that matches (EDM2: dec.*_in before dec.*)
        if group == "output" and re.match(patterns["middle"], name):
            continue
        if re.match(patterns[group], name):
            return g
    return None


def block_groups(names: Iterable[str], arch: str | None, kwargs: dict | None = None) -> dict[str, int]:
    """{tensor name: group index into GROUPS} for every tensor of a network of `arch` (unet, edm2, sit). Every
    tensor must fall in a group and every group must hold a tensor (else per-block coefficients would be idle)."""
    names = list(names)
    if arch in ("unet", None):
        groups = {n: pattern_group(n, UNET_PATTERNS) for n in names}
    elif arch == "edm2":
        groups = {n: pattern_group(n, EDM2_PATTERNS) for n in names}
    elif arch == "sit":
        depth = int((kwargs or {}).get("depth") or 1 + max(
            [int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))], default=0))
        groups = {n: sit_group(n, depth) for n in names}
    else:
        raise ValueError(f"per-block merging coefficients know the architectures unet, edm2 and sit, not {arch!r}; "
                         "use merge.space=global")
    loose = [n for n, g in groups.items() if g is None]
    if loose:
        raise ValueError(f"tensors {loose[:5]} of the {arch} network are in no block group ({', '.join(GROUPS)}); "
                         "use merge.space=global for this network")
    empty = [GROUPS[g] for g in range(len(GROUPS)) if g not in groups.values()]
    if empty:
        raise ValueError(f"the {arch} network has no tensors in the block group(s) {empty}: per-block coefficients "
                         "need all three; use merge.space=global")
    return groups
