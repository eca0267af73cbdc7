"""The reference transforms: Resize((448, 448)) bilinear -> ToTensor -> CenterCrop(392) -> ImageNet normalise."""
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(image_size: int, crop_size: int) -> T.Compose:
    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.CenterCrop(crop_size),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def mask_transform(image_size: int, crop_size: int) -> T.Compose:
    """Masks go through the same bilinear resize and crop; binarisation happens at evaluation."""
    return T.Compose([T.Resize((image_size, image_size)), T.CenterCrop(crop_size), T.ToTensor()])
