"""Affine-LN: the weight and bias of both LayerNorms in every encoder block (36,864 in ViT-B/32),
named by the model's family."""

import re

from hpo_peft.methods.base import MethodConfig, SelectiveMethod
from hpo_peft.models import ModuleNames


class AffineLNConfig(MethodConfig):
    include_pre_post: bool = False  # also the LayerNorms before/after the blocks (39,936 in ViT-B/32)


class AffineLN(SelectiveMethod):
    name = "affine_ln"
    Config = AffineLNConfig

    def tunes(self, name: str, config: AffineLNConfig, names: ModuleNames) -> bool:
        return bool(re.search(names.block_norms, name) or (config.include_pre_post and re.search(names.outer_norms, name)))
