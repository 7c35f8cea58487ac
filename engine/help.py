"""`python SCRIPT.py --help`, generated from the script's declarations: the options of each config group it takes
and every key with what it takes, under the heading of the dataclass that declares it. The script's own words
(what it does, usage, examples) stay in config/hydra/help/<script>.yaml, whose template places the generated
parts (`${hydra.help.groups}`, `${hydra.help.keys}`)."""
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from engine.errors import UserError
from engine.script import Script
from engine.settings import EngineSettings, declared

KEY_WIDTH = 20


def group_options(script: Script, config_dir: str) -> dict[str, list[str]]:
    """group -> the options (config/<group>/*.yaml) the script takes: those its group declaration accepts."""
    options = {}
    for group, declaration in script.groups.items():
        options[group] = []
        for path in sorted(Path(config_dir, group).glob("*.yaml")):
            try:
                declaration(OmegaConf.load(path))
            except UserError:
                continue
            options[group].append(path.stem)
    return options


def key_lines(script: Script) -> list[str]:
    """Every top-level key, grouped by the dataclass that declares it (its docstring's first line as heading)."""
    lines, heading = [], None
    mro = script.settings.__mro__
    by_owner = sorted(declared(script.settings).values(), key=lambda d: (d.owner is EngineSettings, mro.index(d.owner)))
    for d in by_owner:
        # a dataclass without a docstring gets its signature as __doc__: its name is the heading then
        doc, name = (d.owner.__doc__ or "").strip(), d.owner.__name__
        title = name if not doc or doc.startswith(f"{name}(") else doc.splitlines()[0]
        if title != heading:
            lines += ([""] if lines else []) + [title]
            heading = title
        lines.append(f"  {d.key:<{KEY_WIDTH}} {d.rule.describe()}" + (f"; {d.help}" if d.help else ""))
    return lines


def register_help(script: Script, config_dir: str) -> None:
    groups = "\n".join(f"{group}: {', '.join(names)}" for group, names in group_options(script, config_dir).items())
    keys = "\n".join(key_lines(script))
    # `$$`: Hydra's help template is a string.Template (and declarations hold no `${` interpolation)
    ConfigStore.instance().store(group="hydra/help", name=f"{script.name}_keys",
                                 node={"groups": groups.replace("$", "$$"), "keys": keys.replace("$", "$$")})
