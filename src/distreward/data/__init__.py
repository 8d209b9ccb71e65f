"""Datasets. One convention for the whole project, decided here:

images are float32 tensors (B, C, H, W) in [-1, 1]; uint8 pixels map by x / 127.5 - 1.
Fashion-MNIST (28x28) is zero-padded by 2 pixels of background (-1) to 32x32, the size the embedded
UNet and feature networks use (`FMNIST_PAD`).
"""

from .common import IMAGE_RANGE, as_rgb, to_float_images, to_uint8_images, pad_to, check_images
from .fmnist import FMNIST_CLASSES, FMNIST_PAD, find_fmnist_dir, load_fmnist
from .folder import load_image_folder, load_npz_images, load_images

__all__ = [
    "IMAGE_RANGE", "as_rgb", "to_float_images", "to_uint8_images", "pad_to", "check_images",
    "FMNIST_CLASSES", "FMNIST_PAD", "find_fmnist_dir", "load_fmnist",
    "load_image_folder", "load_npz_images", "load_images",
]
