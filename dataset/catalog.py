"""The `dataset=` options (config/dataset/*.yaml) and the keys they share, declared once.

Each option's `supports` says which scripts read it: `maxl` (a label hierarchy, maxl_train.py) and/or `mela`
(few-shot splits, the MeLa scripts). A dataset's own keys (hier_file's files, custom's classes, ...) are checked
by its reader (dataset/hierarchical.py, dataset/fewshot/sources.py) before a run starts.
"""
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

from omegaconf import OmegaConf

from engine.errors import UserError
from engine.settings import POSITIVE_INT, AnyOf, Boolean, Integer, Null, Number, NumberList, OneOf, setting

DATASET_CONFIGS = Path(__file__).resolve().parent.parent / "config" / "dataset"
AUTO = "auto"  # a level read from the labels
VIEWS = {"maxl": "a dataset with a label hierarchy (for maxl_train.py), without few-shot splits",
         "mela": "a few-shot dataset without a label hierarchy"}


@lru_cache(maxsize=4)
def dataset_names(view: str) -> tuple[str, ...]:
    """The `dataset=` options a script reading `view` (maxl or mela) takes."""
    return tuple(sorted(path.stem for path in DATASET_CONFIGS.glob("*.yaml")
                        if view in (OmegaConf.load(path).get("supports") or [])))


@dataclass
class ImageSettings:
    """Every dataset: normalisation and training augmentation."""

    mean: list = setting([0.5, 0.5, 0.5], NumberList(3, Number()), "per-channel mean of the normalisation")
    std: list = setting([0.2, 0.2, 0.2], NumberList(3, Number(above=0)), "per-channel std of the normalisation")
    crop_padding: int = setting(4, Integer(0), "training augmentation: RandomCrop(image size, padding)")
    hflip: bool = setting(True, Boolean(), "training augmentation: random horizontal flips")
    image_size: int = setting(32, POSITIVE_INT, "the side images are resized to (datasets whose images vary)")


PRIMARY_LEVEL = AnyOf((OneOf((AUTO,)), POSITIVE_INT))
AUXILIARY_LEVEL = AnyOf((OneOf((AUTO,)), Null("primary task only"), POSITIVE_INT))


@dataclass
class HierarchicalSettings(ImageSettings):
    """Datasets with a label hierarchy (maxl_train.py); a level is named by its number of classes."""

    primary_level: object = setting(AUTO, PRIMARY_LEVEL, "the primary task's level")
    auxiliary_level: object = setting(AUTO, AUXILIARY_LEVEL, "the finer level human uses and psi is derived from")


def check_view(node, view: str, reader: str) -> None:
    """The `dataset=` option `node` has the `view` (maxl or mela) that `reader` (words for who reads it) needs."""
    if OmegaConf.is_missing(node, "supports") or OmegaConf.is_missing(node, "name") or view in (node.supports or []):
        return
    names = dataset_names(view)
    other = next(v for v in VIEWS if v != view)
    takes = "take" if reader.startswith("the ") else "takes"  # "the MeLa scripts take", "x.py takes"
    raise UserError(f"dataset={node.name} is {VIEWS[other]}: {reader} {takes} dataset={', '.join(names[:-1])} or "
                    f"{names[-1]}")


def _reading(view: str, schema: type):
    """`script` -> the `dataset=` group's declaration for it: `node` -> the dataclass declaring its keys (a dataset
    without the `view` is refused)."""
    def settings_of(script: str, node) -> type:
        check_view(node, view, f"{script}.py")
        return schema

    return lambda script: partial(settings_of, script)


hierarchical_dataset = _reading("maxl", HierarchicalSettings)
few_shot_dataset = _reading("mela", ImageSettings)
