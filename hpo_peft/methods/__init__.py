"""The method registry: one entry per method. Adding a method = one file + one line here."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from hpo_peft.core.config import describe_validation_errors
from hpo_peft.core.errors import UserError
from hpo_peft.methods.affine_ln import AffineLN
from hpo_peft.methods.base import Method, MethodConfig
from hpo_peft.methods.bias import Bias
from hpo_peft.methods.coop import CoOp, KgCoOp
from hpo_peft.methods.black_box import (
    CLAP,
    CLIPAdapter,
    LinearProbe,
    ZeroShotLinearProbe,
)
from hpo_peft.methods.full import Full
from hpo_peft.methods.lora import LoRA
from hpo_peft.methods.tip_adapter import TipAdapter, TipAdapterF
from hpo_peft.methods.zero_shot import ZeroShot

__all__ = ["METHODS", "Method", "MethodConfig", "get_method", "method_config"]

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        ZeroShot(),
        AffineLN(),
        Bias(),
        LoRA(),
        Full(),
        LinearProbe(),
        ZeroShotLinearProbe(),
        CLIPAdapter(),
        CLAP(),
        TipAdapter(),
        TipAdapterF(),
        CoOp(),
        KgCoOp(),
    )
}


def get_method(name: str, key: str = "method.name") -> Method:
    if name not in METHODS:
        raise UserError(f"{key}: unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str, options: dict[str, Any] | None, key: str = "methods") -> MethodConfig:
    """Validate one method's options; errors name the config key, e.g. `methods.lora.rank`."""
    method = get_method(name, key)
    try:
        return method.Config.model_validate(options or {})
    except ValidationError as err:
        raise UserError("; ".join(describe_validation_errors(err, f"{key}.{name}"))) from None
