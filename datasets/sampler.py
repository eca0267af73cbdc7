"""Training batches indexed by global step: the batch of step s depends only on (seed, s).

That makes resuming exact (start again at step s) and lets several processes agree on the global
batch without communicating.
"""
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Yields the batches of steps start_step..total_steps-1.

    Each epoch is a fresh permutation seeded by (seed, epoch) with the last incomplete batch dropped,
    i.e. uniform sampling over the concatenated images, as the reference's shuffled DataLoader. With
    fewer images than a batch (few-shot runs), an epoch is one batch cut from as many permutations,
    one after the other, as it takes to fill it. With `class_ids`, an epoch instead draws the same
    number of images with every class equally likely.
    `rank`/`world_size` keep this process's contiguous share of each global batch.
    With `modalities` m > 1 (MulSen-AD) sample o + k * n is image k of object o of n = num_samples / m:
    the draw above picks batch_size / m objects, and a batch holds their first images, then their
    second ones, and so on (the released RGB-IR batch, torch.cat([rgb, ir])); with several processes
    each keeps all images of its share of the objects.
    With `draws`, each item is (index, draw): `draw` seeds the random choices of that read (see
    TrainSet.__getitem__), a number of (seed, step, position in the global batch) alone.
    """

    def __init__(self, num_samples: int, batch_size: int, total_steps: int, seed: int, start_step: int = 0,
                 class_ids: Optional[Sequence[int]] = None, rank: int = 0, world_size: int = 1,
                 modalities: int = 1, draws: bool = False):
        if num_samples % modalities or batch_size % modalities:
            raise ValueError(f"{num_samples} images and a batch of {batch_size} do not split into {modalities} "
                             "images per object")
        num_samples, batch_size = num_samples // modalities, batch_size // modalities
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size * modalities} is not divisible by the {world_size} processes")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.modalities = modalities
        self.steps_per_epoch = max(1, num_samples // batch_size)
        self.total_steps = total_steps
        self.seed = seed
        self.start_step = start_step
        self.weights = None
        if class_ids is not None:
            ids = torch.as_tensor(class_ids)[:num_samples]  # an object's class: that of its first image
            self.weights = 1.0 / torch.bincount(ids).double()[ids]
        share = batch_size // world_size
        self.slice = slice(rank * share, (rank + 1) * share)
        self.draws = draws

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        count = self.steps_per_epoch * self.batch_size
        if self.weights is None:
            draws = -(-count // self.num_samples)  # 1 unless the images do not fill a batch
            order = torch.cat([torch.randperm(self.num_samples, generator=generator) for _ in range(draws)])[:count]
        else:
            order = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        return order.view(self.steps_per_epoch, self.batch_size)

    def __iter__(self) -> Iterator[list]:
        epoch, batches = None, None
        for step in range(self.start_step, self.total_steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                batches = self.epoch_batches(epoch)
            objects = batches[step % self.steps_per_epoch, self.slice]
            indices = torch.cat([objects + k * self.num_samples for k in range(self.modalities)]).tolist()
            if not self.draws:
                yield indices
                continue
            images = self.batch_size * self.modalities  # of the global batch
            first = (self.seed * 1_000_003 + step) * images + self.slice.start * self.modalities
            yield [(index, first + position) for position, index in enumerate(indices)]

    def __len__(self) -> int:
        return self.total_steps - self.start_step
