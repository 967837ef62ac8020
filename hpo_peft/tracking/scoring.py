"""Scoring a stored trial: its adapter downloaded from MLflow, rebuilt on the base model (never
taken from memory), evaluated on the test split, and the result logged on the trial's own run.
`hpo-peft evaluate` and `compare` score through here."""

from __future__ import annotations

from pathlib import Path

from hpo_peft.fewshot.artifacts import load_adapter
from hpo_peft.core.config import StudyConfig
from hpo_peft.data import LabelledImages
from hpo_peft.fewshot.evaluate import Metrics, evaluate_as_trained
from hpo_peft.fewshot.settings import TrialSettings
from hpo_peft.models.classifier import BaseVLM
from hpo_peft.tracking.run_record import log_test_result
from hpo_peft.tracking.tracker import Tracker, temporary_folder


def evaluate_run(tracker: Tracker, run_id: str, base: BaseVLM, test: LabelledImages,
                 config: StudyConfig) -> tuple[Metrics, dict]:
    with temporary_folder() as tmp:
        classifier, metadata = load_adapter(tracker.download_adapter(run_id, Path(tmp)), base, config.data.categories,
                                            label=f"run {run_id}")  # errors name the run, not the download
    settings = TrialSettings.saved(metadata, config.train.device)  # as it trained: its own precision
    classifier.to(settings.placement.device)
    metrics = evaluate_as_trained(classifier, test, base.preprocessing, config.data.categories, settings)
    log_test_result(tracker, run_id, metrics, test, config)
    return metrics, metadata
