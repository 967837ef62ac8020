"""Bias tuning (BitFit): every bias of the vision tower (102,912 in ViT-B/32), including fused
ones such as `nn.MultiheadAttention`'s `in_proj_bias`."""

from hpo_peft.methods.base import MethodConfig, SelectiveMethod


class Bias(SelectiveMethod):
    name = "bias"

    def tunes(self, name: str, config: MethodConfig, names) -> bool:
        return name.rpartition(".")[2].endswith("bias")
