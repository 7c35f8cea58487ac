"""The flat (image, label) dataset every MeLa step reads: training batches, feature extraction, task sampling.

Images stay uint8 [N, H, W, 3] as loaded (a memory map for the large npy files), or a tensor on the training
device (`images_on`); the transform runs on the gathered batch, where the images are. `__getitems__` lets a
DataLoader fetch a whole batch with one gather and one batched augmentation; augmentation draws from torch's
default CPU generator, which the engine seeds per batch (engine/distributed.py SeededBatches).
"""
import dataclasses

import numpy as np
import torch

from dataset.fewshot.transforms import ImageTransform
from engine.errors import UserError

ROTATIONS = 4


class FlatDataset(torch.utils.data.Dataset):
    """`dataset[i] -> (image [3, H, W] float, label, i)`.

    labels: [N] ints, or [N, L] for several label levels (h_aircraft's three-head set); each column is shifted
    to start at 0, so `n_cls` (max + 1, an int, or a tuple per column) counts the ids in between too.
    rotate: the dataset is 4N long; item i is image i % N turned by 90 * (i // N) degrees, labelled
    `label + n_cls * (i // N)`.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: ImageTransform, rotate: bool = False,
                 name: str = ""):
        labels = np.asarray(labels, dtype=np.int64)
        if len(images) == 0:
            raise UserError(f"dataset {name} has no images: check its files (download or convert them again)")
        if len(images) != len(labels):
            raise UserError(f"dataset {name}: {len(images)} images but {len(labels)} labels; the data files "
                            f"disagree (download or convert them again)")
        if rotate and images.shape[1] != images.shape[2]:
            raise UserError(f"dataset {name}: rotation needs square images, these are {images.shape[1]}x"
                            f"{images.shape[2]}: set rotate_aug=false or resize the images")
        self.images = images
        self.labels = labels - labels.min(axis=0)
        self.transform = transform
        self.rotate = rotate
        self.name = name
        maxima = self.labels.max(axis=0)
        self.n_cls = int(maxima) + 1 if self.labels.ndim == 1 else tuple(int(m) + 1 for m in maxima)

    def __len__(self) -> int:
        return len(self.labels) * (ROTATIONS if self.rotate else 1)

    def targets(self) -> np.ndarray:
        """The label of every item, rotated copies included (what the task samplers draw classes from)."""
        if not self.rotate:
            return self.labels
        return np.concatenate([self.labels + np.asarray(self.n_cls) * k for k in range(ROTATIONS)])

    def load(self, indices, out: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Items `indices` as one batch: images [B, 3, H, W] float on the images' device (transformed, into `out`
        if given, augmented from `generator`), labels [B] (or [B, L])."""
        indices = np.asarray(indices, dtype=np.int64)
        rotations, base = np.divmod(indices, len(self.labels))
        if isinstance(self.images, torch.Tensor):
            images = self.images[torch.from_numpy(base).to(self.images.device)]
        else:
            images = torch.from_numpy(np.ascontiguousarray(self.images[base]))
        x = self.transform(images, rotations if self.rotate else None, out, generator)
        labels = self.labels[base]
        if self.rotate:
            labels = labels + np.multiply.outer(rotations, np.asarray(self.n_cls))
        return x, torch.from_numpy(labels)

    def __getitems__(self, indices):
        x, labels = self.load(indices)
        return [(x[b], labels[b], int(i)) for b, i in enumerate(indices)]

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def image_bytes(self) -> int:
        return self.images.nbytes

    def images_on(self, device: torch.device) -> "FlatDataset":
        """The same dataset with its images a tensor on `device` (batches are then gathered and augmented there)."""
        images = torch.from_numpy(np.ascontiguousarray(self.images)).to(device)
        return FlatDataset(images, self.labels, self.transform, self.rotate, self.name)

    def with_options(self, augment: bool | None = None, rotate: bool | None = None) -> "FlatDataset":
        """The same images and labels (not copied) with augmentation and/or rotation switched."""
        transform = self.transform if augment is None else dataclasses.replace(self.transform, augment=augment)
        return FlatDataset(self.images, self.labels, transform, self.rotate if rotate is None else rotate, self.name)
