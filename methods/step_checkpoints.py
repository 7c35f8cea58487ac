"""Reading the checkpoint of an earlier MeLa step: which steps a key takes, the backbone it holds, its config.

Every step's checkpoint holds state["model"]: the backbone itself (learn_meta_repr), a classifier with
`backbone.*` (learn_labeler, sup_baseline), or the frozen backbone with its ResFC head (fine_tune); and the
resolved config, from which the next step rebuilds the architecture. Next to them the training steps save how to
find the backbone (`model_layout`): `backbone_prefix`, the prefix of the backbone's keys in state["model"] ("" when
the model is the backbone), and `resfc_head`, whether the features are those of fine_tune's ResFC head.
Checkpoints written before these entries existed are read by the name of the step that wrote them.
"""
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from engine.checkpoint import file_identity, load_checkpoint, resolve_checkpoint
from engine.errors import UserError
from models import create_model
from models.resfc import FrozenBackboneHead

META_STEPS = ("learn_meta_repr",)
PRETRAINED_STEPS = ("learn_labeler", "sup_baseline", "learn_meta_repr")
EVALUATED_STEPS = ("learn_meta_repr", "learn_labeler", "fine_tune", "sup_baseline")


def model_layout(backbone_prefix: str, resfc_head: bool = False) -> dict:
    """The entries a training step saves next to state["model"] so that a later step finds the backbone."""
    return {"backbone_prefix": backbone_prefix, "resfc_head": resfc_head}


def saved_layout(payload: dict) -> dict:
    """The checkpoint's `model_layout`; for a checkpoint written before it was saved, the writing step's."""
    if "backbone_prefix" in payload:
        return model_layout(payload["backbone_prefix"], bool(payload.get("resfc_head", False)))
    script = payload["script"]
    return model_layout("" if script in META_STEPS else "backbone.", resfc_head=script == "fine_tune")


def build_backbone(model_cfg) -> torch.nn.Module:
    """The backbone a `model=` config describes (name plus its keyword arguments)."""
    return create_model(model_cfg.name, **{k: v for k, v in model_cfg.items() if k != "name"})


def load_step(value, key: str, steps: tuple[str, ...], checkpoint_dir, session=None) -> tuple[dict, Path]:
    """The checkpoint a `pretrained_*` key names (run name or .pt path), written by one of `steps`. With `session`
    (a training step): the run records which checkpoint it starts from and refuses to continue from another."""
    producers = " or ".join(f"{step}.py" for step in steps)
    path = resolve_checkpoint(value, Path(checkpoint_dir), key, producers)
    payload = load_checkpoint(path, fix=f"give {key} a checkpoint written by {producers}")
    if payload.get("script") not in steps:
        writer = f"a checkpoint of {payload['script']}.py" if payload.get("script") else \
            "a checkpoint that does not name the script that wrote it"
        raise UserError(f"{key}={value} is {writer}; {key} takes one written by {producers}")
    saved = OmegaConf.create(payload["config"]) if isinstance(payload["config"], str) else None
    if not isinstance(saved, DictConfig) or not isinstance(saved.get("model"), DictConfig) \
            or "name" not in saved.model:
        raise UserError(f"{key}={value}: {path} has no model in its config (not written by {producers}): give "
                        f"{key} a checkpoint written by {producers}")
    if session is not None:
        session.check_inputs({key: file_identity(path)})
    return payload, path


def saved_model_cfg(payload: dict):
    return OmegaConf.create(payload["config"]).model


def check_architecture(payload: dict, model_cfg, key: str, path: Path) -> None:
    """The checkpoint's backbone must be the configured one (same name and size arguments). Keys the saved config
    does not have (added to the model configs later) are not compared."""
    saved = OmegaConf.to_container(saved_model_cfg(payload))
    current = OmegaConf.to_container(model_cfg, resolve=True)
    if saved != {k: v for k, v in current.items() if k in saved}:
        overrides = " ".join(f"model.{k}={v}" for k, v in saved.items() if k != "name")
        raise UserError(f"{key}: {path} holds a {saved['name']} backbone {saved} but this run builds {current}: "
                        f"run with model={saved['name']} {overrides}")


def backbone_state(payload: dict) -> dict:
    """The backbone's weights out of any step's checkpoint."""
    state = payload["state"]["model"]
    prefix = saved_layout(payload)["backbone_prefix"]
    if not prefix:
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_weights(module: torch.nn.Module, state: dict, payload: dict) -> None:
    """Weights that do not fit the configured model are one line naming the checkpoint's model."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        saved = OmegaConf.to_container(saved_model_cfg(payload))
        reason = str(exc).strip().splitlines()
        reason = reason[1].strip() if len(reason) > 1 else (reason[0] if reason else type(exc).__name__)
        overrides = " ".join(f"model.{k}={v}" for k, v in saved.items() if k != "name")
        raise UserError(f"the weights of the {payload.get('script')} checkpoint do not fit the configured model "
                        f"({reason[:200]}): it holds model={saved.get('name')} {overrides}; run with those "
                        f"settings or give another checkpoint") from None


def pretrained_backbone(payload: dict, model_cfg) -> torch.nn.Module:
    backbone = build_backbone(model_cfg)
    _load_weights(backbone, backbone_state(payload), payload)
    return backbone


def fine_tune_network(backbone: torch.nn.Module) -> FrozenBackboneHead:
    """fine_tune's network: ResFC (residual, LayerNorm) on the L2-normalised features of a frozen backbone."""
    return FrozenBackboneHead(backbone, create_model("resfc", in_dim=backbone.feat_dim, out_dim=backbone.feat_dim))


def feature_model(payload: dict, model_cfg) -> torch.nn.Module:
    """What meta_eval evaluates: the backbone, with its ResFC head for a fine_tune checkpoint."""
    backbone = pretrained_backbone(payload, model_cfg)
    if not saved_layout(payload)["resfc_head"]:
        return backbone
    network = fine_tune_network(backbone)
    _load_weights(network, payload["state"]["model"], payload)
    return network
