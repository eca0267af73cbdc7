"""The reference transforms: Resize((448, 448)) bilinear -> ToTensor -> CenterCrop(392) -> Normalize(mean, std).

mean/std are the encoder's (models.input_normalization); every registered family uses ImageNet's."""
from typing import Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F


def image_transform(image_size: int, crop_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([*resize_and_crop(image_size, crop_size).transforms, T.Normalize(mean, std)])


def resize_and_crop(image_size: int, crop_size: int) -> T.Compose:
    """The transform without normalisation: what an exported model takes (it normalises inside)."""
    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.CenterCrop(crop_size)])


def mask_transform(image_size: int, crop_size: int) -> T.Compose:
    """Masks go through the same bilinear resize and crop; binarisation happens at evaluation."""
    return T.Compose([T.Resize((image_size, image_size)), T.CenterCrop(crop_size), T.ToTensor()])


class RandomRotate90:
    """A turn by 0, 90, 180 or 270 degrees, each equally likely (exact on the square crops it gets)."""

    def __call__(self, image):
        return F.rotate(image, 90 * int(torch.randint(4, ()).item()))


def strong_transform(image_size: int, crop_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Dinomaly2's few-shot training augmentation (get_strong_transforms): Resize((size, size)), a random
    crop of area (crop/size)^2 of the image and aspect 0.95..1.05 resized to crop x crop, a random turn by a
    multiple of 90 degrees, horizontal and vertical flips (p 0.5 each), ToTensor, Normalize."""
    area = (crop_size / image_size) ** 2
    return T.Compose([T.Resize((image_size, image_size)),
                      T.RandomResizedCrop((crop_size, crop_size), scale=(area, area), ratio=(0.95, 1.05)),
                      RandomRotate90(), T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.ToTensor(),
                      T.Normalize(mean, std)])
