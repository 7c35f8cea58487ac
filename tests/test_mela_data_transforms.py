"""MeLa transforms: normalisation values, augmentation honoured for every dataset, rotation x4."""
import numpy as np
import pytest
import torch
from mela_data_layouts import write_h_aircraft, write_metadataset, write_mini_imagenet

from dataset.fewshot import FlatDataset, ImageTransform, dataset_config, load_split

CLASSES = {"train": 4, "val": 3, "test": 3}


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKSPACE", str(tmp_path))
    data_dir = tmp_path / "metaL_data"
    write_mini_imagenet(data_dir / "miniImageNet", CLASSES, 5)
    write_metadataset(data_dir, CLASSES, 5)
    write_h_aircraft(data_dir / "aircraft", CLASSES, 5)
    return data_dir


def test_imagenet_and_mixed_normalisation_values(data_dir):
    mini = load_split(dataset_config("miniImageNet"), "train")[0].flat
    x, _ = mini.load([0, 3])
    raw = torch.from_numpy(mini.images[[0, 3]]).permute(0, 3, 1, 2).float()
    mean = torch.tensor([120.39586422, 115.59361427, 104.54012653]).view(1, 3, 1, 1)
    std = torch.tensor([70.68188272, 68.27635443, 72.54505529]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std, atol=1e-5, rtol=1e-5)
    aircraft = load_split(dataset_config("mixed"), "val")[0].flat
    x, _ = aircraft.load(np.arange(len(aircraft)))
    raw = torch.from_numpy(aircraft.images).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x, raw * 2 - 1)


@pytest.mark.parametrize("name", ["miniImageNet", "mixed", "h_aircraft"])
def test_data_aug_is_honoured_for_every_dataset(name, data_dir):
    plain = load_split(dataset_config(name), "train")
    augmented = load_split(dataset_config(name), "train", augment=True)
    for sub_plain, sub_aug in zip(plain, augmented):
        indices = np.arange(len(sub_plain.flat))
        x_plain, y_plain = sub_plain.flat.load(indices)
        x_aug, y_aug = sub_aug.flat.load(indices)
        assert torch.equal(y_plain, y_aug) and x_aug.shape == x_plain.shape
        assert torch.equal(x_plain, sub_plain.flat.load(indices)[0])  # no augmentation: deterministic
        assert not torch.equal(x_aug, x_plain)
        assert not torch.equal(x_aug, sub_aug.flat.load(indices)[0])  # each call draws new crops/jitter/flips


def test_augmentation_keeps_shape_and_crops_with_zero_padding():
    images = np.full((8, 20, 20, 3), 255, dtype=np.uint8)
    transform = ImageTransform((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), augment=True, crop_padding=8)
    torch.manual_seed(0)
    x = transform(torch.from_numpy(images))
    assert x.shape == (8, 3, 20, 20)
    assert (x == 0).any()  # some crops reach into the zero padding
    no_crop = ImageTransform((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), augment=True, crop_padding=0, hflip=False)
    gradient = np.broadcast_to(np.arange(20, dtype=np.uint8)[None, None, :, None] * 10, (4, 20, 20, 3)).copy()
    out = no_crop(torch.from_numpy(gradient))
    assert (out[:, :, :, 1:] >= out[:, :, :, :-1]).all()  # no mirroring: the left-to-right ramp stays increasing


def test_rotation_turns_images_and_offsets_labels():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 10, 10, 3), dtype=np.uint8)
    labels = np.array([3, 3, 4, 4, 5, 5])
    flat = FlatDataset(images, labels, ImageTransform((0.5,) * 3, (0.5,) * 3), rotate=True, name="toy")
    assert len(flat) == 24 and flat.n_cls == 3
    np.testing.assert_array_equal(flat.targets(), np.concatenate([[0, 0, 1, 1, 2, 2]] * 4) + np.repeat([0, 3, 6, 9], 6))
    upright, _ = flat.load(range(6))
    for k in range(4):
        turned, y = flat.load(range(6 * k, 6 * k + 6))
        torch.testing.assert_close(turned, torch.rot90(upright, k, dims=(-2, -1)))
        assert y.tolist() == [3 * k, 3 * k, 3 * k + 1, 3 * k + 1, 3 * k + 2, 3 * k + 2]
    image, label, index = flat[13]
    assert (int(label), index) == (2 * 3 + 0, 13)
    augmented = flat.with_options(augment=True)
    assert augmented.images is flat.images and len(augmented) == 24 and augmented.transform.augment


def test_rotation_needs_square_images():
    from engine.errors import UserError

    with pytest.raises(UserError, match="rotation needs square images, these are 8x6"):
        FlatDataset(np.zeros((2, 8, 6, 3), np.uint8), np.array([0, 1]), ImageTransform((0.5,) * 3, (0.5,) * 3),
                    rotate=True, name="toy")
