"""Turn the official VisA download into the MVTec-like '1cls' layout that the loaders read.

    python prepare_data/prepare_visa.py --data_folder ../VisA --save_folder ../VisA_pytorch
    python train_uni.py --config configs/visa_uni.yaml --data_path ../VisA_pytorch/1cls

The split comes from split_csv/1cls.csv inside the download (columns object, split, label, image,
mask; --split_csv to use another copy). It writes
    <save_folder>/1cls/<class>/train/good/       normal training images
    <save_folder>/1cls/<class>/test/good/        normal test images
    <save_folder>/1cls/<class>/test/bad/         anomalous test images
    <save_folder>/1cls/<class>/ground_truth/bad/ their masks, as PNG with every non-zero value set to 255
Files already in place are kept, so running it again only completes a partial run. A file listed in
the CSV but missing from the download is an error naming it.
"""
import argparse
import csv
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

COLUMNS = ("object", "split", "label", "image", "mask")
EXPECTED = {"train": 8659, "test good": 962, "test bad": 1200}


def read_split(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"split file not found: {csv_path} (it ships in the VisA download as "
                                f"split_csv/1cls.csv; pass --split_csv if it lives elsewhere)")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or any(c not in rows[0] for c in COLUMNS):
        raise ValueError(f"{csv_path}: expected the columns {', '.join(COLUMNS)}")
    return rows


def destination(row: dict[str, str], out: Path) -> tuple[str, Path, Path | None]:
    """(counting key, image destination, mask destination or None) of one CSV row."""
    cls_dir = out / "1cls" / row["object"]
    name = Path(row["image"]).name
    if row["split"] == "train":
        if row["label"] != "normal":
            raise ValueError(f"training row for {row['image']} is labelled '{row['label']}', expected normal")
        return "train", cls_dir / "train" / "good" / name, None
    if row["label"] == "normal":
        return "test good", cls_dir / "test" / "good" / name, None
    return "test bad", cls_dir / "test" / "bad" / name, cls_dir / "ground_truth" / "bad" / (Path(name).stem + ".png")


def binarise_mask(source: Path, target: Path) -> None:
    mask = np.array(Image.open(source))
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    tmp = target.with_name(target.name + ".tmp.png")
    Image.fromarray(np.where(mask != 0, 255, 0).astype(np.uint8)).save(tmp)
    tmp.replace(target)


def copy_file(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def prepare(data_folder: Path, save_folder: Path, split_csv: Path | None = None) -> dict[str, Counter]:
    """Write the 1cls layout; return the counts per class and split."""
    rows = read_split(split_csv or data_folder / "split_csv" / "1cls.csv")
    counts: dict[str, Counter] = {}
    for row in tqdm(rows, desc="VisA", unit="image"):
        key, image_out, mask_out = destination(row, save_folder)
        image_in = data_folder / row["image"]
        if not image_in.is_file():
            raise FileNotFoundError(f"image listed in the split file not found: {image_in}")
        image_out.parent.mkdir(parents=True, exist_ok=True)
        if not image_out.exists():
            copy_file(image_in, image_out)
        if mask_out is not None:
            mask_in = data_folder / row["mask"]
            if not row["mask"] or not mask_in.is_file():
                raise FileNotFoundError(f"mask listed for {image_in} not found: {mask_in}")
            mask_out.parent.mkdir(parents=True, exist_ok=True)
            if not mask_out.exists():
                binarise_mask(mask_in, mask_out)
        counts.setdefault(row["object"], Counter())[key] += 1
    return counts


def summary(counts: dict[str, Counter]) -> str:
    lines = [f"{'class':<12} {'train':>6} {'test good':>10} {'test bad':>9}"]
    for name, c in sorted(counts.items()):
        lines.append(f"{name:<12} {c['train']:>6} {c['test good']:>10} {c['test bad']:>9}")
    totals = {key: sum(c[key] for c in counts.values()) for key in EXPECTED}
    lines.append(f"{'total':<12} {totals['train']:>6} {totals['test good']:>10} {totals['test bad']:>9}")
    if totals != EXPECTED:
        lines.append(f"note: the official VisA split has {EXPECTED['train']} / {EXPECTED['test good']} / "
                     f"{EXPECTED['test bad']}; this CSV lists a different set")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_folder", required=True, type=Path, help="the unpacked VisA download")
    parser.add_argument("--save_folder", required=True, type=Path, help="where 1cls/ is written")
    parser.add_argument("--split_csv", type=Path, help="default: <data_folder>/split_csv/1cls.csv")
    args = parser.parse_args()
    try:
        counts = prepare(args.data_folder, args.save_folder, args.split_csv)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(summary(counts))
    print(f"done: train with --data_path {args.save_folder / '1cls'}")


if __name__ == "__main__":
    main()
