"""Bias tuning (BitFit): every bias of the vision tower (102,912 in ViT-B/32)."""

from hpo_peft.methods.base import MethodConfig, SelectiveMethod


class Bias(SelectiveMethod):
    name = "bias"

    def selects(self, name: str, config: MethodConfig) -> bool:
        return name.endswith(".bias")
