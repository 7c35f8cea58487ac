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


def test_weights_that_do_not_fit_or_a_config_without_model_are_one_line(tmp_path):
    import pytest
    import torch
    from omegaconf import OmegaConf

    from engine.checkpoint import save_checkpoint
    from engine.errors import UserError
    from methods.step_checkpoints import META_STEPS, load_step, pretrained_backbone

    model = {"name": "resnet12", "width_mult": 0.125}
    payload = {"script": "learn_meta_repr", "epoch": 0, "config": OmegaConf.to_yaml({"model": model}),
               "state": {"model": {"layer1.0.conv1.weight": torch.zeros(1)}}}
    with pytest.raises(UserError, match="the weights of the learn_meta_repr checkpoint do not fit the configured "
                                        "model .*model=resnet12 model.width_mult=0.125"):
        pretrained_backbone(payload, OmegaConf.create(model))
    save_checkpoint(tmp_path / "nomodel.pt", {**payload, "config": OmegaConf.to_yaml({"seed": 0})})
    with pytest.raises(UserError, match="nomodel.pt has no model in its config"):
        load_step(str(tmp_path / "nomodel.pt"), "pretrained_labeler", META_STEPS, tmp_path)
    save_checkpoint(tmp_path / "noscript.pt", {k: v for k, v in payload.items() if k != "script"})
    with pytest.raises(UserError, match="a checkpoint that does not name the script that wrote it"):
        load_step(str(tmp_path / "noscript.pt"), "pretrained_labeler", META_STEPS, tmp_path)
