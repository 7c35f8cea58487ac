"""The documentation's key tables and the declarations stay in step: the tables of docs/configuration.md are
generated from the declarations (`python -m tools.config_docs`) and must be current; every key that any key table
of README.md or docs/*.md names exists in some config.

A key table is a markdown table whose header starts with the cell `key`; its keys are the backticked names in the
first column (`a`, `b` or `model.width_mult`; `group.*` stands for a group's node). Keys under `hydra.` belong to
Hydra and are not checked here.
"""
import re

import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from engine import compose
from methods.scripts import SCRIPTS
from tools import config_docs

GROUPS = ("dataset", "model")
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))


def table_keys(path) -> dict[str, int]:
    """Each key named in the first column of the file's key tables -> the line that names it first."""
    keys, in_key_table, header = {}, False, False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.lstrip().startswith("|"):
            in_key_table, header = False, False
            continue
        first = line.strip().strip("|").split("|")[0].strip()
        if not header:  # a table's first row is its header
            header, in_key_table = True, first == "key"
            continue
        if in_key_table and not set(first) <= set("-: "):  # skip the |---| row
            for name in re.findall(r"`([^`]+)`", first):
                keys.setdefault(name, number)
    return keys


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    """Each script's composed config, and each group option's file, as plain nested dicts (unresolved)."""
    trees = {name: OmegaConf.to_container(compose(script, []), resolve=False) for name, script in SCRIPTS.items()}
    for group in GROUPS:
        for path in sorted((ROOT / "config" / group).glob("*.yaml")):
            trees[f"{group}={path.stem}"] = {group: OmegaConf.to_container(OmegaConf.load(path), resolve=False)}
    return trees


def exists(key: str, trees) -> bool:
    parts = key.removesuffix(".*").split(".")
    for tree in trees:
        node = tree
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return True
    return False


def test_the_generated_key_tables_are_current(workspace):
    text = config_docs.DOC.read_text()
    assert config_docs.updated(text) == text, "stale: run python -m tools.config_docs"


def test_every_top_level_key_of_every_script_is_in_the_generated_table(configs):
    documented = table_keys(config_docs.DOC)
    missing = [f"{name}: {key}" for name in SCRIPTS for key in configs[name] if key not in documented]
    assert not missing, "config keys that the generated table lacks:\n  " + "\n  ".join(missing)


def test_every_key_a_key_table_names_exists_in_some_config(configs):
    documented = {}
    for path in DOCS:
        for name, number in table_keys(path).items():
            documented.setdefault(name, f"{path.relative_to(ROOT)}:{number}")
    unknown = [f"{where}: {key}" for key, where in documented.items()
               if not key.startswith("hydra.") and not exists(key, configs.values())]
    assert not unknown, "keys in the key tables that no config has:\n  " + "\n  ".join(unknown)


def test_the_table_reader_takes_first_column_keys_of_key_tables_only(tmp_path):
    doc = tmp_path / "keys.md"
    doc.write_text("| key | default |\n|---|---|\n| `seed`, `model.width_mult` | `0` |\n\n"
                   "| `dataset=` | files |\n|---|---|\n| `digits` | none |\n")
    assert table_keys(doc) == {"seed": 3, "model.width_mult": 3}
