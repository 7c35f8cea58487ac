"""Generated CIFAR-100 archives with CIFAR-100's own class names and hierarchy (the official python layout,
written by dataset.cifar100.write_synthetic), and MetaOptNet-format CIFAR-FS / FC100 pickles written the way
Python 2 wrote them."""
import numpy as np
from test_safe_pickle import Python2Pickler

from dataset.cifar100 import write_synthetic

# CIFAR-100's superclasses and their fine classes, as the dataset's documentation lists them (facts).
HIERARCHY = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
COARSE_NAMES = sorted(HIERARCHY)  # the archive lists both levels in alphabetical order
FINE_NAMES = sorted(sum(HIERARCHY.values(), []))
COARSE_OF = [COARSE_NAMES.index(next(c for c, fine in HIERARCHY.items() if name in fine)) for name in FINE_NAMES]


def write_cifar100(directory, train_per_class: int = 8, test_per_class: int = 2, seed: int = 0):
    """A small archive in CIFAR-100's python layout (meta, train, test) with its real names, 32x32 images."""
    write_synthetic(directory, train_per_class, test_per_class, 32, seed, fine_names=FINE_NAMES,
                    coarse_names=COARSE_NAMES, coarse_of=COARSE_OF)


def write_metaoptnet_pickles(archive, directory, prefix: str, split_classes: dict) -> dict:
    """`<prefix>_<split>.pickle` as the MetaOptNet release has them: a dict with `data` [N, 32, 32, 3] uint8 and
    `labels` (CIFAR-100 fine ids), images of each split's fine classes taken from the archive `(images, fine ids)`,
    written by a Python-2-style pickler. Returns split -> fine names."""
    images, fine = archive
    directory.mkdir(parents=True, exist_ok=True)
    for split, names in split_classes.items():
        ids = [FINE_NAMES.index(n) for n in names]
        rows = np.flatnonzero(np.isin(fine, ids))[::-1]  # another order than the archive's
        with open(directory / f"{prefix}_{split}.pickle", "wb") as handle:
            Python2Pickler(handle, protocol=2).dump({b"data": images[rows], b"labels": fine[rows].tolist()})
    return split_classes
