"""Scoring a stored trial: its adapter downloaded from MLflow, rebuilt on the base model (never
taken from memory), evaluated on the test split, and the result logged on the trial's own run.
`hpo-peft evaluate` and `compare` score through here; a study's ensemble run (`ensemble.py`) is
scored the same way, its members each as they trained."""

from __future__ import annotations

from pathlib import Path

from hpo_peft.core.config import StudyConfig
from hpo_peft.data import LabelledImages
from hpo_peft.fewshot.evaluate import Metrics, compute_metrics
from hpo_peft.fewshot.predict import load_predictor
from hpo_peft.models.classifier import BaseVLM
from hpo_peft.tracking.run_record import log_test_result
from hpo_peft.tracking.tracker import Tracker, temporary_folder


def evaluate_run(tracker: Tracker, run_id: str, base: BaseVLM, test: LabelledImages,
                 config: StudyConfig) -> tuple[Metrics, dict]:
    with temporary_folder() as tmp:  # errors name the run, not the download; each adapter in its own precision
        predictor = load_predictor(tracker.download_adapter(run_id, Path(tmp)), base, config.train.device,
                                   label=f"run {run_id}", categories=config.data.categories)
    logits = predictor.logits(test.images, config.train.eval_batch_size)
    metrics = compute_metrics(logits, test.labels, config.data.categories)
    log_test_result(tracker, run_id, metrics, test, config)
    return metrics, predictor.metadata
