"""`dataset=<name>` configs outside Hydra (tests, benchmarks, notebooks), composed as a script would see them."""
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dataset.catalog import DATASET_CONFIGS, dataset_names
from engine.errors import UserError
from engine.workspace import data_root


def mela_dataset_names() -> list[str]:
    """The `dataset=` choices with a MeLa view (`supports` lists mela)."""
    return list(dataset_names("mela"))


def dataset_config(name: str, data_dir: Path | None = None, **overrides) -> DictConfig:
    """config/dataset/<name>.yaml with `${data_dir}` = `data_dir` (default $WORKSPACE/metaL_data) and
    `overrides` (dotted keys, e.g. `**{"generate.image_size": 84}`) applied."""
    path = DATASET_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(mela_dataset_names())}")
    root = OmegaConf.create({"data_dir": str(data_dir or data_root()), "dataset": OmegaConf.load(path)})
    for key, value in overrides.items():
        OmegaConf.update(root, f"dataset.{key}", value, merge=False)
    return root.dataset
