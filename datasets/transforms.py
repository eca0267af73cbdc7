"""The reference transforms: Resize((448, 448)) bilinear -> ToTensor -> CenterCrop(392) -> Normalize(mean, std).

mean/std are the encoder's (models.input_normalization); every registered family uses ImageNet's."""
from typing import Sequence

from torchvision import transforms as T


def image_transform(image_size: int, crop_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([*resize_and_crop(image_size, crop_size).transforms, T.Normalize(mean, std)])


def resize_and_crop(image_size: int, crop_size: int) -> T.Compose:
    """The transform without normalisation: what an exported model takes (it normalises inside)."""
    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.CenterCrop(crop_size)])


def mask_transform(image_size: int, crop_size: int) -> T.Compose:
    """Masks go through the same bilinear resize and crop; binarisation happens at evaluation."""
    return T.Compose([T.Resize((image_size, image_size)), T.CenterCrop(crop_size), T.ToTensor()])
