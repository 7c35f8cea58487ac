"""The MeLa data layer: few-shot datasets, their flat views, transforms and task samplers.

What a MeLa script calls (`cfg.dataset` is the `dataset=<name>` config group):

    from dataset.fewshot import load_split, load_supervised_set, make_tasks

    train = load_split(cfg.dataset, "train", augment=cfg.data_aug)    # [SubDataset(name, flat), ...]
    val = load_split(cfg.dataset, "val")                              # one entry per domain / label level
    tasks = make_tasks(train, n_ways=5, n_shots=5, n_queries=15, shape="few_shot", no_replacement=True,
                       fixed_db=True, db_size=None, seed=cfg.seed)
    loader = session.loader(tasks, cfg.tasks_per_step, shuffle=True)  # batches of tasks stacked on a leading axis
    # hand the loader to the engine (a Phase of a TrainingJob, run by session.fit): before every epoch it calls
    # session.set_epoch(epoch), which tells the tasks and the loader's sampler the epoch
    features: iterate a FlatDataset in order, e.g. session.loader(val[0].flat, 256, shuffle=False)
    sup_baseline: load_supervised_set(cfg.dataset, "train", augment=..., rotate=...)

- `load_split`: split is train, val or test; mixed gives aircraft, cub, vgg; h_aircraft gives aircraft_variant,
  aircraft_maker, aircraft_family (`dataset.levels`); every other dataset one sub-dataset named after it.
- `FlatDataset`: `ds[i] -> (image [3, H, W] float normalised, label, i)`; `.labels` (numpy int64, from 0),
  `.n_cls`, `.images` (uint8 [N, H, W, 3], loaded once or memory-mapped), `.load(indices) -> (x, y)` for a
  batch, `.targets()`, `.with_options(augment=, rotate=)` (the same arrays, another transform),
  `.images_on(device)` (the engine's loader does it for the GPU, see `data_device`); rotate: see its docstring.
- `make_tasks(...) -> TaskMixture` (one `TaskDataset` per sub-dataset, with `set_epoch`; semantics in
  `dataset.fewshot.tasks`). An impossible task (n_ways above a split's classes, n_shots + n_queries above a
  class's images) is a UserError when the tasks are made.
- `load_supervised_set(...) -> FlatDataset`: the true-label training set (mixed: domains concatenated with label
  offsets; h_aircraft: labels [N, 3] for three heads).
- `ImageTransform` / `transform_from_config(dataset_cfg, augment)`: the transform of a FlatDataset built from
  other labels (the labeler's pseudo-labels): `FlatDataset(images, labels, transform, rotate)`.
- `dataset_config(name, data_dir=None, **overrides)`: a dataset config outside Hydra.
"""
from dataset.fewshot.config import dataset_config, mela_dataset_names
from dataset.fewshot.flat import FlatDataset
from dataset.fewshot.sources import SubDataset, load_split, load_supervised_set
from dataset.fewshot.tasks import FewShotTask, FlatTask, TaskDataset, TaskMixture, make_tasks
from dataset.fewshot.transforms import ImageTransform, transform_from_config

__all__ = ["dataset_config", "mela_dataset_names", "FlatDataset", "SubDataset", "load_split", "load_supervised_set",
           "FewShotTask", "FlatTask", "TaskDataset", "TaskMixture", "make_tasks", "ImageTransform",
           "transform_from_config"]
