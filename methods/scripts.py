"""The six scripts as the engine sees them: each one's settings (the declarations it reads, from the code that reads
them), its config groups, its checks and its learning-rate key. The top-level scripts hand these to `hydra_main`;
the tools (pipeline, docs) read them from here."""
from dataclasses import dataclass

from dataset import hierarchical
from dataset.catalog import few_shot_dataset, hierarchical_dataset
from dataset.fewshot.sources import check_config as check_few_shot_files
from dataset.fewshot.tasks import TaskShapeSettings, TrainingTaskSettings
from dataset.fewshot.transforms import AugmentSettings
from engine.script import Script
from engine.settings import AnyOf, BatchSettings, EngineSettings, EpochSettings, Integer, Null, OneOf, Text, setting
from methods.fewshot_eval import ClassifierSettings, EvaluationSettings, ValidationSettings
from methods.labeler import LabelerSettings
from methods.maxl import MaxlSettings
from methods.meta_ls import MetaLSSettings, RidgeSettings
from methods.optimizers import ScheduleSettings, SGDSettings
from models import model_settings

CHECKPOINT = AnyOf((Null("not set"), Text("the run name or .pt path of a checkpoint")))
SPLITS = ("train", "val", "test")


@dataclass
class MelaRunSettings:
    """A MeLa step's run."""

    trial: object = setting(1, AnyOf((Integer(), Text("a name", plain=True))), "run-name suffix, as the original")


@dataclass
class PretrainedModelSettings:
    """The checkpoint a step starts from."""

    pretrained_model: object = setting(None, CHECKPOINT, "run name or .pt path of an earlier step's checkpoint")


@dataclass
class PretrainedLabelerSettings:
    """The meta-learned backbone the labeler sees the images through."""

    pretrained_labeler: object = setting(None, CHECKPOINT, "learn_meta_repr.py's run name or .pt path")


@dataclass
class SplitSettings:
    """The evaluated split."""

    split: str = setting("test", OneOf(SPLITS), "test | val | train")


@dataclass
class MaxlTrainSettings(EngineSettings, MaxlSettings):
    pass


@dataclass
class LearnMetaReprSettings(EngineSettings, EpochSettings, MelaRunSettings, TrainingTaskSettings, AugmentSettings,
                            MetaLSSettings, SGDSettings, ValidationSettings, EvaluationSettings, ClassifierSettings):
    pass


@dataclass
class LearnLabelerSettings(EngineSettings, EpochSettings, BatchSettings, MelaRunSettings, PretrainedLabelerSettings,
                           TrainingTaskSettings, LabelerSettings, SGDSettings, RidgeSettings, ValidationSettings,
                           EvaluationSettings):
    pass


@dataclass
class FineTuneSettings(EngineSettings, EpochSettings, MelaRunSettings, PretrainedModelSettings, TrainingTaskSettings,
                       AugmentSettings, MetaLSSettings, ScheduleSettings, ValidationSettings, EvaluationSettings,
                       ClassifierSettings):
    pass


@dataclass
class SupBaselineSettings(EngineSettings, EpochSettings, BatchSettings, MelaRunSettings, AugmentSettings,
                          SGDSettings, TaskShapeSettings, EvaluationSettings, ClassifierSettings):
    pass


@dataclass
class MetaEvalSettings(EngineSettings, MelaRunSettings, PretrainedModelSettings, SplitSettings, TaskShapeSettings,
                       EvaluationSettings, ClassifierSettings):
    pass


def _mela(name: str, settings: type, **kwargs) -> Script:
    return Script(name, settings, groups={"dataset": few_shot_dataset(name), "model": model_settings},
                  checks=(lambda cfg: check_few_shot_files(cfg.dataset),), **kwargs)


MAXL_TRAIN = Script("maxl_train", MaxlTrainSettings,
                    groups={"dataset": hierarchical_dataset("maxl_train"), "model": model_settings},
                    checks=(hierarchical.check_config,), lr_key="lr")
LEARN_META_REPR = _mela("learn_meta_repr", LearnMetaReprSettings, lr_key="learning_rate")
LEARN_LABELER = _mela("learn_labeler", LearnLabelerSettings, lr_key="learning_rate")
FINE_TUNE = _mela("fine_tune", FineTuneSettings, lr_key="learning_rate")
SUP_BASELINE = _mela("sup_baseline", SupBaselineSettings, lr_key="learning_rate")
META_EVAL = _mela("meta_eval", MetaEvalSettings, writes_checkpoints=False)
SCRIPTS = {script.name: script for script in (MAXL_TRAIN, LEARN_META_REPR, LEARN_LABELER, FINE_TUNE, META_EVAL,
                                              SUP_BASELINE)}
