"""MVTec 3D-AD -> the tree Dinomaly2's RGB-D setting reads, written into a NEW folder (never in place).

    python prepare_data/prepare_mvtec3d.py --data_path ../mvtec_3d --out ../mvtec_3d_dinomaly [--workers 8]

Runs the two preprocessing steps of the released code (negin-kafee/Dinomaly2 @1745c61,
prepare_data/preprocess_mvtec3d_1.py, itself 3D-ADS's utils/preprocessing.py, then preprocess_mvtec3d_2.py)
on every <class>/<split>/<defect>/xyz/<name>.tiff, with their constants:

 1. the background plane: RANSAC (threshold 0.004, 50 points per draw, 1,000 draws, Open3D's
    segment_plane) on the points of the 10-pixel border frame; every pixel within 0.005 of it -> 0 in xyz and rgb;
 2. xyz, rgb and gt zero-padded to a square whose side is the larger side rounded up to a multiple of 100;
 3. DBSCAN (eps 0.006, min 30 points) on the points with no zero coordinate; all but the largest label -> 0;
 4. z = the last channel of xyz, its holes filled three times by the released rule (fill_gaps below);
 5. written to <out>/<class>/<split>/<defect>/{xyz,rgb,gt,z}/<name>.{tiff,png,png,tiff}.

Differences from the released scripts, none of which changes a step's arithmetic: a new tree instead of an
overwrite (a rerun of the released script fits a plane to an already zeroed frame); the RANSAC draws come from
numpy's generator seeded by --seed and the file's relative path, so a rerun writes the same files (Open3D seeds
from random_device); partner files are found by name in the sibling folders, not by str.replace on the full
path; validation/ gets z/ too. A rerun skips every sample whose z file exists (z is written last).
Needs tifffile (requirements-mvtec3d.txt): OpenCV reads the three-channel float tiffs with their channels
swapped or not depending on how each file was written, tifffile in stored order.
"""
import argparse
import math
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.run_setup import run_cli  # noqa: E402

BORDER = 10                  # pixels of the frame the plane is fitted to
PLANE_FIT_DISTANCE = 0.004   # RANSAC inlier distance (segment_plane distance_threshold)
PLANE_POINTS = 50            # points per RANSAC draw (ransac_n)
PLANE_ITERATIONS = 1000
PLANE_CUT_DISTANCE = 0.005   # pixels this close to the plane are background
DBSCAN_EPS, DBSCAN_MIN_POINTS = 0.006, 30
FILLS = 3                    # hole-filling passes
RANSAC_CONFIDENCE = 0.99999999  # Open3D's early stop
RANSAC_CHUNK = 100           # draws evaluated together (speed only: the draws and their order are the same)


class PreparationError(ValueError):
    """A file that is not what MVTec 3D-AD holds: one line naming it."""


SCRIPT_ERRORS = (PreparationError,)  # this script's own user mistakes, beside utils.run_setup.USER_ERRORS


def read_xyz(path: Path) -> np.ndarray:
    import tifffile
    try:
        xyz = tifffile.imread(path)
    except Exception as error:
        raise PreparationError(f"cannot read point cloud {path}: {error}") from None
    if xyz.ndim != 3 or xyz.shape[2] != 3 or not np.issubdtype(xyz.dtype, np.floating):
        raise PreparationError(f"{path} is not an organized point cloud: expected an H x W x 3 float tiff, got "
                               f"shape {xyz.shape} {xyz.dtype}")
    return xyz


def border_points(xyz: np.ndarray) -> np.ndarray:
    """The points of the BORDER-pixel frame with no zero coordinate; corner points appear twice, as released."""
    frame = [xyz[:BORDER], xyz[-BORDER:], xyz[:, :BORDER], xyz[:, -BORDER:]]
    points = np.concatenate([f.reshape(-1, 3) for f in frame])
    return points[np.all(points != 0, axis=1)]


def plane_from_points(points: np.ndarray) -> np.ndarray:
    """Open3D's GetPlaneFromPoints: the normal from the cofactors of the centred scatter matrix's largest
    determinant, unit length, d = -n . centroid. Works on a stack of point sets (... x N x 3)."""
    points = points.astype(np.float64)
    centroid = points.mean(axis=-2)
    r = points - centroid[..., None, :]
    xx, xy, xz = (r[..., 0] * r[..., 0]).sum(-1), (r[..., 0] * r[..., 1]).sum(-1), (r[..., 0] * r[..., 2]).sum(-1)
    yy, yz, zz = (r[..., 1] * r[..., 1]).sum(-1), (r[..., 1] * r[..., 2]).sum(-1), (r[..., 2] * r[..., 2]).sum(-1)
    det_x, det_y, det_z = yy * zz - yz * yz, xx * zz - xz * xz, xx * yy - xy * xy
    normals = np.stack([
        np.stack([det_x, xz * yz - xy * zz, xy * yz - xz * yy], -1),
        np.stack([xz * yz - xy * zz, det_y, xy * xz - yz * xx], -1),
        np.stack([xy * yz - xz * yy, xy * xz - yz * xx, det_z], -1)], -2)
    pick = np.argmax(np.stack([det_x, det_y, det_z], -1), axis=-1)
    n = np.take_along_axis(normals, pick[..., None, None], axis=-2)[..., 0, :]
    n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    return np.concatenate([n, -(n * centroid).sum(-1, keepdims=True)], -1)


def early_stop(fitness: float) -> float:
    """Open3D's bound on the draws needed at this inlier share. log1p keeps it finite where fitness^50
    rounds 1 - fitness^50 to 1 (fitness below about 0.48; a border frame is mostly plane): there Open3D's
    log(1 - x) is 0 and its bound -inf, here the draws simply continue to 1,000."""
    share = fitness ** PLANE_POINTS
    return math.log(1 - RANSAC_CONFIDENCE) / math.log1p(-share) if share > 0 else math.inf


def fit_plane(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Open3D's segment_plane(0.004, 50, 1000) with numpy draws: each draw fits PLANE_POINTS distinct points;
    the best plane has the most inliers (distance < threshold), a tie going to the lower sum(dist)/sqrt(count);
    the loop stops early at Open3D's confidence bound; the result is refitted to the best plane's inliers."""
    if len(points) < PLANE_POINTS:
        raise PreparationError(f"only {len(points)} border points with no zero coordinate, "
                               f"fewer than the {PLANE_POINTS} a plane fit draws")
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1).astype(np.float64)
    best_count, best_error, best_plane = 0, math.inf, None
    limit = PLANE_ITERATIONS
    for start in range(0, PLANE_ITERATIONS, RANSAC_CHUNK):  # draws scored RANSAC_CHUNK at a time, judged in turn
        if start >= limit:
            break
        draws = [rng.choice(len(points), PLANE_POINTS, replace=False) for _ in range(RANSAC_CHUNK)]
        planes = plane_from_points(points[np.stack(draws)])
        distance = np.abs(homogeneous @ planes.T)
        inliers = distance < PLANE_FIT_DISTANCE
        counts, sums = inliers.sum(axis=0), np.where(inliers, distance, 0).sum(axis=0)
        for it in range(RANSAC_CHUNK):
            if start + it >= limit:
                break
            count = int(counts[it])
            error = sums[it] / math.sqrt(count) if count else math.inf
            if count > best_count or (count == best_count and error < best_error):
                best_count, best_error, best_plane = count, error, planes[it]
                fitness = count / len(points)
                limit = start + it + 1 if fitness >= 1.0 else min(limit, early_stop(fitness))
    inliers = np.abs(homogeneous @ best_plane) < PLANE_FIT_DISTANCE
    return plane_from_points(points[inliers])


def remove_plane(xyz: np.ndarray, rgb: np.ndarray, plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel within PLANE_CUT_DISTANCE of the plane -> 0 in xyz and rgb (zero points included: the
    released code tests |d| for them, which is not below the cut for a plane away from the origin)."""
    homogeneous = np.concatenate([xyz.reshape(-1, 3), np.ones((xyz.shape[0] * xyz.shape[1], 1))], axis=1)
    on_plane = (np.abs(homogeneous @ plane) < PLANE_CUT_DISTANCE).reshape(xyz.shape[:2])
    xyz, rgb = xyz.copy(), rgb.copy()
    xyz[on_plane], rgb[on_plane] = 0, 0
    return xyz, rgb


def pad_square(array: np.ndarray) -> np.ndarray:
    """Zero padding to a square of the larger side rounded up to a multiple of 100, centred (extra row or
    column at the bottom / right)."""
    height, width = array.shape[:2]
    side = max(math.ceil(height / 100) * 100, math.ceil(width / 100) * 100)
    top, left = (side - height) // 2, (side - width) // 2
    pad = [(top, side - height - top), (left, side - width - left)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="constant")


def keep_largest_cluster(xyz: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DBSCAN over the points with no zero coordinate; those outside the most populous label -> 0. As released,
    the label counted is any label, DBSCAN's noise (-1) included, and points with some zero coordinate stay."""
    from sklearn.cluster import DBSCAN
    flat = xyz.reshape(-1, 3)
    valid = np.nonzero(np.all(flat != 0, axis=1))[0]
    xyz, rgb = xyz.copy(), rgb.copy()
    if len(valid) == 0:
        return xyz, rgb
    labels = DBSCAN(eps=DBSCAN_EPS, min_samples=DBSCAN_MIN_POINTS).fit_predict(flat[valid].astype(np.float64))
    ids, counts = np.unique(labels, return_counts=True)
    drop = valid[labels != ids[np.argmax(counts)]]
    xyz.reshape(-1, 3)[drop] = 0
    rgb.reshape(-1, rgb.shape[2] if rgb.ndim == 3 else 1)[drop] = 0
    return xyz, rgb


def fill_gaps(z: np.ndarray) -> np.ndarray:
    """One pass of the released rule: a pixel exactly 0 becomes the sum of its 3 x 3 window divided by the
    number of window values > 0 (unchanged when there are none), all reading the previous pass. Quirks kept:
    row 0 and column 0 are never filled (the released slice starts at -1, an empty window), windows at the
    other edges are clipped, and since the background is 0 each pass grows the silhouette by one pixel.
    The window sum runs in float32 in the order numpy sums the released window (pairwise for 9 values, in
    turn for the 4 or 6 of a clipped one), then / count in float64 -> float32: bit-identical to the released loop."""
    padded = np.pad(z, ((1, 1), (1, 1)))
    height, width = z.shape
    w = [padded[1 + dy: 1 + dy + height, 1 + dx: 1 + dx + width] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    total = ((w[0] + w[1]) + (w[2] + w[3])) + ((w[4] + w[5]) + (w[6] + w[7])) + w[8]  # numpy's sum of 9 values
    edge = np.zeros_like(z)
    for window in w:  # a clipped window (last row or column) has < 8 values: numpy sums them in turn
        edge += window
    total[-1, :], total[:, -1] = edge[-1, :], edge[:, -1]
    count = sum((window > 0).astype(np.int64) for window in w)
    holes = z == 0
    holes[0, :], holes[:, 0] = False, False
    fill = holes & (count > 0)
    out = z.copy()
    out[fill] = (total[fill].astype(np.float64) / count[fill]).astype(z.dtype)
    return out


def depth_channel(xyz: np.ndarray) -> np.ndarray:
    z = xyz[:, :, -1].copy()
    for _ in range(FILLS):
        z = fill_gaps(z)
    return z


def partner(xyz_path: Path, folder: str, suffix: str) -> Path:
    """<defect>/<folder>/<name><suffix> beside <defect>/xyz/<name>.tiff: found by name, not by str.replace."""
    return xyz_path.parent.parent / folder / (xyz_path.stem + suffix)


def prepare_sample(xyz_path: Path, root: Path, out: Path, seed: int) -> str:
    """Both released steps on one sample; returns 'done' or 'skipped'."""
    relative = xyz_path.relative_to(root)
    target = out / relative
    z_path = partner(target, "z", ".tiff")
    if z_path.is_file():
        return "skipped"
    import tifffile
    xyz = read_xyz(xyz_path)
    rgb_path, gt_path = partner(xyz_path, "rgb", ".png"), partner(xyz_path, "gt", ".png")
    if not rgb_path.is_file():
        raise PreparationError(f"point cloud {xyz_path} has no image: expected {rgb_path}")
    rgb = np.array(Image.open(rgb_path))
    if rgb.shape[:2] != xyz.shape[:2]:
        raise PreparationError(f"image {rgb_path} is {rgb.shape[1]}x{rgb.shape[0]} but its point cloud {xyz_path} "
                               f"is {xyz.shape[1]}x{xyz.shape[0]}")
    rng = np.random.default_rng([seed, zlib.crc32(relative.as_posix().encode())])
    xyz, rgb = remove_plane(xyz, rgb, fit_plane(border_points(xyz), rng))
    xyz, rgb = keep_largest_cluster(pad_square(xyz), pad_square(rgb))
    outputs = [(partner(target, "xyz", ".tiff"), lambda p: tifffile.imwrite(p, xyz, photometric="rgb")),
               (partner(target, "rgb", ".png"), lambda p: Image.fromarray(rgb).save(p, format="PNG"))]
    if gt_path.is_file():
        gt = pad_square(np.array(Image.open(gt_path)))
        outputs.append((partner(target, "gt", ".png"), lambda p: Image.fromarray(gt).save(p, format="PNG")))
    z = depth_channel(xyz)
    outputs.append((z_path, lambda p: Image.fromarray(z).save(p, format="TIFF")))  # float32, mode F, as released
    for path, write in outputs:  # z last: its presence marks a finished sample
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        tmp.replace(path)
    return "done"


def find_point_clouds(root: Path) -> list[Path]:
    if not root.is_dir():
        raise PreparationError(f"--data_path is not a folder: {root}")
    paths = sorted(root.glob("*/*/*/xyz/*.tiff"))
    if not paths:
        raise PreparationError(f"no point clouds <class>/<split>/<defect>/xyz/*.tiff under {root} (MVTec 3D-AD)")
    return paths


def _prepare(job: tuple[Path, Path, Path, int]) -> str:
    return prepare_sample(*job)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data_path", required=True, help="the MVTec 3D-AD download (read only)")
    parser.add_argument("--out", required=True, help="the prepared tree (a new folder)")
    parser.add_argument("--workers", type=int, default=1, help="processes preparing samples in parallel")
    parser.add_argument("--seed", type=int, default=0, help="seeds every file's RANSAC draws")
    args = parser.parse_args(argv)
    root, out = Path(args.data_path).resolve(), Path(args.out).resolve()
    if out == root or root in out.parents:
        raise PreparationError(f"--out {out} must not be the dataset or inside it: the preparation never writes in place")
    jobs = [(path, root, out, args.seed) for path in find_point_clouds(root)]
    states = []
    with (ProcessPoolExecutor(args.workers) if args.workers > 1 else nullcontext() as pool,
          tqdm(total=len(jobs), desc="preparing", unit="file") as bar):  # the bar ends its line before an error
        for state in pool.map(_prepare, jobs, chunksize=4) if pool else map(_prepare, jobs):
            states.append(state)
            bar.update()
    print(f"{states.count('done')} samples prepared, {states.count('skipped')} already there, in {out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], SCRIPT_ERRORS))
