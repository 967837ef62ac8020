"""Model families behind one interface (`models/base.py`): `hf_clip` (PLIP and CLIP-format
models of `transformers`), `open_clip` (QuiltNet) and `conch` (CONCH). Adding a family is one
file here and one registry line; nothing outside this package asks which family it has.

`model.family` names the family; without it, the source decides where it is unambiguous: an
`hf-hub:`/`local-dir:` name or a folder with `open_clip_config.json` is open_clip, CONCH's
`hf_hub:MahmoodLab/conch` or a folder laid out as its hub repository is conch, a folder with
`config.json` or a hub id is hf_clip; a folder that two families claim must be named."""

from __future__ import annotations

from hpo_peft.core.config import ModelConfig
from hpo_peft.core.errors import UserError
from hpo_peft.models.base import BaseVLM, Family, FamilyEncoder, ModuleNames
from hpo_peft.models.conch import Conch
from hpo_peft.models.hf_clip import HFClip
from hpo_peft.models.open_clip import OpenClip

__all__ = ["FAMILIES", "BaseVLM", "Family", "FamilyEncoder", "ModuleNames", "family_of", "get_family",
           "load_base_model"]

FAMILIES: dict[str, Family] = {family.name: family for family in (HFClip(), OpenClip(), Conch())}
DEFAULT_FAMILY = "hf_clip"  # hub ids such as vinid/plip


def get_family(name: str, where: str = "model.family") -> Family:
    if name not in FAMILIES:
        raise UserError(f"{where}: unknown model family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: ModelConfig) -> Family:
    """The family `model.family` names, or the one the source surely belongs to."""
    family = getattr(config, "family", None)
    if family is not None:
        return get_family(family)
    claims = [f for f in FAMILIES.values() if f.recognises(config.name_or_path)]
    if len(claims) > 1:
        raise UserError(f"model.family: {config.name_or_path!r} could be {' or '.join(f.name for f in claims)} "
                        f"(it holds the files of each); set model.family")
    return claims[0] if claims else FAMILIES[DEFAULT_FAMILY]


def load_base_model(config: ModelConfig) -> BaseVLM:
    return family_of(config).load(config)
