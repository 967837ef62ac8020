"""Zero-shot: the text prototypes as they are; nothing trains."""

from hpo_peft.methods.base import Method


class ZeroShot(Method):
    name = "zero_shot"
    trains = False
    trains_encoder = False
