"""Data on the training device: datasets whose images moved (`images_on`) give the same batches, num_workers=auto,
data_device=cuda refused without a GPU. (On CPU the moved images are a CPU tensor: the code a GPU runs.)"""
import numpy as np
import pytest
import torch

from dataset.augment import Augmentation
from dataset.fewshot import FlatDataset, ImageTransform, SubDataset, make_tasks
from dataset.hierarchical import ImageDataset
from engine.errors import UserError
from engine.session import resolve_device, resolve_workers
from engine.settings import MAX_AUTO_WORKERS

IMAGES = np.random.default_rng(0).integers(0, 256, (40, 10, 10, 3), dtype=np.uint8)
LABELS = np.repeat(np.arange(4), 10)


def test_flat_dataset_and_tasks_with_moved_images_give_the_same_batches():
    flat = FlatDataset(IMAGES, LABELS, ImageTransform((0.5,) * 3, (0.2,) * 3, augment=True), rotate=True)
    moved = flat.images_on(torch.device("cpu"))
    assert isinstance(moved.images, torch.Tensor) and moved.image_bytes() == IMAGES.nbytes
    indices = [3, 41, 97, 150, 7]
    torch.manual_seed(1)  # what SeededBatches does before each batch
    expected = flat.__getitems__(indices)
    torch.manual_seed(1)
    for (x, y, i), (x_moved, y_moved, i_moved) in zip(expected, moved.__getitems__(indices)):
        assert torch.equal(x, x_moved) and torch.equal(y, y_moved) and i == i_moved
    tasks = make_tasks([SubDataset("toy", flat)], n_ways=2, n_shots=1, n_queries=2, seed=3)
    moved_tasks = tasks.images_on(torch.device("cpu"))
    assert moved_tasks.image_bytes() == IMAGES.nbytes and tasks.datasets[0].flat.images is IMAGES  # not moved
    for epoch in (0, 1):
        tasks.set_epoch(epoch)
        moved_tasks.set_epoch(epoch)
        for a, b in zip(tasks[1], moved_tasks[1]):
            assert torch.equal(a, b)


def test_image_dataset_with_moved_images_gives_the_same_batches():
    targets = np.stack([LABELS, LABELS], axis=1)
    dataset = ImageDataset(IMAGES, targets, (0.5,) * 3, (0.25,) * 3, Augmentation(4, hflip=True))
    torch.manual_seed(2)
    expected = torch.utils.data.default_collate(dataset.__getitems__([5, 0, 39]))
    torch.manual_seed(2)
    got = torch.utils.data.default_collate(dataset.images_on(torch.device("cpu")).__getitems__([5, 0, 39]))
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert expected[2].tolist() == [5, 0, 39] and torch.equal(expected[1], torch.as_tensor(targets[[5, 0, 39]]))


@pytest.mark.parametrize("cores, processes, expected", [(2, 1, 1), (16, 1, MAX_AUTO_WORKERS), (16, 2, 7), (2, 4, 1)])
def test_auto_workers_follow_the_usable_cores(monkeypatch, cores, processes, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    workers = resolve_workers("auto", processes)
    assert workers == expected and workers <= cores  # DataLoader warns above the usable cores
    assert resolve_workers(3, processes) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_data_device_cuda_without_a_gpu_is_one_line():
    with pytest.raises(UserError, match="^data_device=cuda but no CUDA GPU is visible: use data_device=cpu or "
                                        "data_device=auto$"):
        resolve_device("auto", 0, "cuda")
