"""Reading an earlier MeLa step's checkpoint: the backbone found by the layout the step saved
(`backbone_prefix`, `resfc_head`), and by the writing step's name in checkpoints written before that."""
import pytest
import torch
from omegaconf import OmegaConf

from methods.step_checkpoints import (backbone_state, build_backbone, feature_model, fine_tune_network, model_layout,
                                      saved_layout)
from methods.supervised import build_classifier
from models.resfc import FrozenBackboneHead

MODEL = OmegaConf.create({"name": "conv4", "width_mult": 0.25})


def networks():
    torch.manual_seed(0)
    backbone = build_backbone(MODEL)
    return {"learn_meta_repr": backbone, "sup_baseline": build_classifier(build_backbone(MODEL), 5),
            "learn_labeler": build_classifier(build_backbone(MODEL), 7), "fine_tune": fine_tune_network(backbone)}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LAYOUTS = {"learn_meta_repr": model_layout(""), "sup_baseline": model_layout("backbone."),
           "learn_labeler": model_layout("backbone."), "fine_tune": model_layout("backbone.", resfc_head=True)}


@pytest.mark.parametrize("with_layout", [True, False], ids=["saved layout", "written before the layout"])
def test_every_steps_backbone_and_features_are_found(with_layout):
    for script, network in networks().items():
        payload = {"script": script, "state": {"model": network.state_dict()}}
        if with_layout:
            payload |= LAYOUTS[script]
        assert saved_layout(payload) == LAYOUTS[script]
        backbone = network if script == "learn_meta_repr" else network.backbone
        assert same_state(backbone_state(payload), backbone.state_dict()), script
        evaluated = feature_model(payload, MODEL)
        assert isinstance(evaluated, FrozenBackboneHead) == (script == "fine_tune")
        assert same_state(evaluated.state_dict(), network.state_dict() if script in ("learn_meta_repr", "fine_tune")
                          else network.backbone.state_dict()), script


def test_the_saved_layout_wins_over_the_scripts_name():
    backbone = networks()["learn_meta_repr"]
    payload = {"script": "learn_labeler", "state": {"model": backbone.state_dict()}, **model_layout("")}
    assert same_state(backbone_state(payload), backbone.state_dict())
