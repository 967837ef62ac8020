"""hpo-peft: hyper-parameter search over parameter-efficient fine-tuning of CLIP-format
vision-language models (PLIP by default) for few-shot histology classification."""

__version__ = "0.1.0"
