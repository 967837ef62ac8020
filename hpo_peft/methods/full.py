"""Full fine-tuning of vision tower and projection: the reference the PEFT methods are weighed against."""

from hpo_peft.methods.base import MethodConfig, SelectiveMethod


class Full(SelectiveMethod):
    name = "full"

    def selects(self, name: str, config: MethodConfig, names) -> bool:
        return True
