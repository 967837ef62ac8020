"""Affine-LN: the weight and bias of layer_norm1/2 in every encoder layer (36,864 in ViT-B/32)."""

import re

from hpo_peft.methods.base import MethodConfig, SelectiveMethod

_ENCODER_LN = re.compile(r"encoder\.layers\.\d+\.layer_norm[12]\.(weight|bias)$")
_OUTER_LN = re.compile(r"(pre_layrnorm|post_layernorm)\.(weight|bias)$")


class AffineLNConfig(MethodConfig):
    include_pre_post: bool = False  # also pre_layrnorm/post_layernorm (39,936 in ViT-B/32)


class AffineLN(SelectiveMethod):
    name = "affine_ln"
    Config = AffineLNConfig

    def selects(self, name: str, config: AffineLNConfig) -> bool:
        return bool(_ENCODER_LN.search(name) or (config.include_pre_post and _OUTER_LN.search(name)))
