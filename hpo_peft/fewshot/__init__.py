"""One few-shot trial, without Optuna or MLflow: training (`train`), scoring (`evaluate`), the frozen
encoder's feature cache (`features`), validation schemes (`validation`), a trial's settings decided
once (`settings`), a trial from settings to outcome (`trial`), saved adapters (`artifacts`),
prediction (`predict`) and the course notebook's own protocol (`course`). It builds on `data/`,
`models/` and `methods/`.
"""

__all__ = ['train', 'evaluate', 'features', 'validation', 'settings', 'trial', 'artifacts', 'predict', 'course']
