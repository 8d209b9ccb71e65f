"""Stand-ins at Fashion-MNIST's size (D = 1024) shared by the tests of the PPO clip, the merge inputs, the demo's
inputs and the reference-set cache: a tiny class-conditional UNet, a stand-in sample-wise reward and a GRPO
config."""

from __future__ import annotations

import torch

from distreward.models.unet import UNet
from distreward.reward import Reward

SHAPE = (1, 32, 32)                              # D = 1024, as Fashion-MNIST
KW = dict(img_resolution=32, img_channels=1, num_classes=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
          attn_resolutions=[])


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(**KW)
    net.generator_meta = {"arch": "unet", "kwargs": KW}      # so finetune saves its merge inputs
    return net


class MeanPixelReward(Reward):
    """Stand-in sample-wise reward: -(mean pixel - target[label])^2 (no state; its features are the images)."""

    name = "mean-pixel"

    def score_features(self, images, labels, groups=None):
        target = torch.tensor([-0.4, 0.0, 0.4])[labels.cpu()]
        return -(images.cpu().float().mean((1, 2, 3)) - target) ** 2


def grpo_cfg(**rl):
    return {"name": "bias", "seed": 0, "model": {"num_classes": 3, "image_shape": list(SHAPE)},
            "rl": {"iterations": 2, "labels_per_iter": 2, "group_size": 4, "steps": 4, "noise_level": 0.7,
                   "train_steps": {"mode": "window", "window": 2}, "inner_epochs": 3, "minibatches": 2,
                   "lr": 1e-4, "ema_decay": 0.5, **rl},
            "reward": {"name": "mean-pixel"}, "eval": {"every": 0}, "checkpoint": {"every": 1}}
