import shutil

import numpy as np
import pytest
from PIL import Image

from datasets import DatasetLayoutError, TestSet, TrainSet, dataset_classes
from datasets.folder import list_test_samples, train_images
from models import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture
def data(synthetic_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    return root


def test_test_samples_pair_masks_and_labels(data):
    samples = list_test_samples(data, "stripes")
    assert sum(s.label == 0 for s in samples) == 8 and sum(s.label == 1 for s in samples) == 12
    for s in samples:
        if s.label:
            assert s.mask == data / "stripes" / "ground_truth" / s.defect / f"{s.image.stem}_mask.png"
        else:
            assert s.mask is None and s.defect == "good"


def test_folder_dataset_discovers_classes(data):
    cfg = {"data_path": str(data), "classes": None, "dataset": "folder"}
    assert dataset_classes(cfg) == ["checker", "stripes"]
    with pytest.raises(DatasetLayoutError, match="data_path does not exist"):
        dataset_classes({**cfg, "data_path": str(data / "nope")})


def test_transforms_match_the_reference_definition(data):
    train = TrainSet({"stripes": train_images(data, "stripes")}, image_size=64, crop_size=56, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD)
    image, index = train[0]
    pil = Image.open(train.samples[0][0]).convert("RGB").resize((64, 64), Image.BILINEAR)
    array = np.asarray(pil, dtype=np.float32)[4:60, 4:60] / 255
    expected = (array - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert index == 0 and image.shape == (3, 56, 56)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    test = TestSet(list_test_samples(data, "stripes"), 64, 56, IMAGENET_MEAN, IMAGENET_STD)
    _, mask, label, _ = test[len(test) - 1]
    assert label == 1 and mask.shape == (1, 56, 56) and mask.max() > 0.5


def test_missing_train_folder_names_path_and_tree(data):
    shutil.rmtree(data / "stripes" / "train")
    with pytest.raises(DatasetLayoutError) as error:
        TrainSet({"stripes": train_images(data, "stripes")}, 64, 56, IMAGENET_MEAN, IMAGENET_STD)
    assert str(data / "stripes" / "train" / "good") in str(error.value)
    assert "expected layout" in str(error.value)


def test_defect_image_without_mask(data):
    (data / "stripes" / "ground_truth" / "blob" / "001_mask.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"defect image .*blob/001.png has no mask"):
        list_test_samples(data, "stripes")


def test_mask_without_image(data):
    (data / "stripes" / "test" / "hole" / "002.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"mask .*hole/002_mask.png has no image"):
        list_test_samples(data, "stripes")


def test_missing_ground_truth_folder(data):
    shutil.rmtree(data / "checker" / "ground_truth" / "scratch")
    with pytest.raises(DatasetLayoutError, match=r"missing masks of defect 'scratch'"):
        list_test_samples(data, "checker")


def test_image_labels_only_read_no_ground_truth(data):
    with_masks = list_test_samples(data, "checker")
    shutil.rmtree(data / "checker" / "ground_truth")
    with pytest.raises(DatasetLayoutError, match=r"missing masks of defect .*--masks none"):
        list_test_samples(data, "checker")  # the default, masks: required
    samples = list_test_samples(data, "checker", masks="none")
    assert [(s.image.name, s.label, s.defect) for s in samples] == [(s.image.name, s.label, s.defect) for s in with_masks]
    assert all(s.mask is None for s in samples) and sum(s.label for s in samples) == 12


def test_unreadable_image_is_named(data):
    bad = data / "stripes" / "train" / "good" / "000.png"
    bad.write_bytes(b"this is not a png")
    train = TrainSet({"stripes": train_images(data, "stripes")}, 64, 56, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(RuntimeError, match=f"cannot decode image {bad}"):
        train[0]


def test_mask_of_another_size_is_named(data):
    mask = data / "stripes" / "ground_truth" / "blob" / "000_mask.png"
    Image.new("L", (50, 50)).save(mask)
    test = TestSet(list_test_samples(data, "stripes"), 64, 56, IMAGENET_MEAN, IMAGENET_STD)
    index = next(i for i, s in enumerate(test.samples) if s.mask == mask)
    with pytest.raises(RuntimeError, match=f"mask {mask} is 50x50"):
        test[index]


def test_empty_class_is_an_error(data):
    for f in (data / "stripes" / "train" / "good").iterdir():
        f.unlink()
    with pytest.raises(DatasetLayoutError, match="no training images in"):
        TrainSet({"stripes": train_images(data, "stripes")}, 64, 56, IMAGENET_MEAN, IMAGENET_STD)
