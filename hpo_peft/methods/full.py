"""Full fine-tuning of vision tower and projection: the reference the PEFT methods are weighed against."""

from hpo_peft.methods.base import MethodConfig, SelectiveMethod


class Full(SelectiveMethod):
    name = "full"
    copies_backbone = True  # about 350 MB per trial for PLIP: only the best few are kept by default

    def tunes(self, name: str, config: MethodConfig, names) -> bool:
        return True
