"""The chosen adapter as an MLflow model (pyfunc flavour), its registration, and finding an
adapter from what a user names (run id, `models:/NAME@ALIAS`, folder).

The model holds the adapter folder as its one artifact; the base model is referenced, not copied:
its id or path, revision and fingerprint are in the adapter's metadata (and in the MLmodel file's
metadata), and loading checks them (`artifacts.load_adapter`). Where the base model lives
elsewhere on the serving machine, pass `model_config={"base_model": PATH}` to
`mlflow.pyfunc.load_model`.

Input: a DataFrame with a column `image` (base64-encoded image file bytes, JPEG/PNG/TIFF) and/or
`path` (an image file readable by the server); a row uses `image` when it is set, else `path`.
Output: one column of probabilities per class. Bad input raises MlflowException with
INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from PIL import UnidentifiedImageError

from hpo_peft.core import interrupts
from hpo_peft.fewshot import predict
from hpo_peft.fewshot.artifacts import METADATA_FILE, read_metadata
from hpo_peft.data import decode_image
from hpo_peft.core.errors import UserError
from hpo_peft.models.classifier import load_base_model
from hpo_peft.core.stores import redact
from hpo_peft.tracking.tracker import Tracker, temporary_folder

MODEL_NAME = "model"
TAG_MODEL_URI = "hpo_peft.model_uri"
ADAPTER_ARTIFACT = "adapter"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class AdapterModel(PythonModel):
    """`mlflow.pyfunc.load_model(...).predict(frame)` -> class probabilities, through
    `predict.Predictor`, the same path as `hpo-peft predict` and `evaluate`."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        folder = Path(context.artifacts[ADAPTER_ARTIFACT])
        metadata = read_metadata(folder)
        base = load_base_model(predict.base_model_config(metadata, config.get("base_model")))
        self.predictor = predict.load_predictor(folder, base, device=config.get("device", "auto"))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        # a DataFrame hint: MLflow infers no schema from it (the logged signature checks the input)
        # and no longer warns on every import that predict has no type hints
        frame = pd.DataFrame(model_input)
        if len(frame) == 0:
            raise _bad_input("empty batch: send at least one row with an 'image' (base64) or 'path' value")
        images = [self._decode(frame, row) for row in range(len(frame))]
        probabilities = self.predictor.probabilities(torch.stack(images))
        return predict.probability_frame(probabilities, self.predictor.categories)

    def _decode(self, frame: pd.DataFrame, row: int):
        encoded, path = (_cell(frame, column, row) for column in ("image", "path"))
        if encoded is None and path is None:
            raise _bad_input(f"row {row}: neither 'image' (base64 bytes) nor 'path' is given")
        try:
            source = io.BytesIO(base64.b64decode(encoded, validate=True)) if encoded is not None else Path(path)
        except (binascii.Error, ValueError, TypeError) as err:
            raise _bad_input(f"row {row}: 'image' is not base64 ({err})") from None
        try:
            return decode_image(source, self.predictor.preprocessing)
        except (UnidentifiedImageError, OSError) as err:
            what = "'image'" if encoded is not None else f"path {path!r}"
            raise _bad_input(f"row {row}: {what} cannot be decoded as an image ({' '.join(str(err).split())})") from None


def _cell(frame: pd.DataFrame, column: str, row: int) -> str | None:
    if column not in frame.columns:
        return None
    value = frame[column].iloc[row]
    if value is None or (isinstance(value, float) and pd.isna(value)) or value == "":
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def signature(categories: list[str]) -> ModelSignature:
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", c) for c in categories]))


def input_example(height: int, width: int) -> pd.DataFrame:
    """One mid-grey PNG of the model's input size, base64-encoded: the shape of a request."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]})


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in ("torch", "transformers", "peft", "safetensors", "pillow", "pandas", "mlflow"):
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def log_adapter_model(tracker: Tracker, run_id: str) -> str:
    """The run's adapter as a pyfunc model linked to the run (once: later calls return the same
    model's URI); returns its `models:/m-...` URI."""
    run = tracker.get_run(run_id)
    if run.data.tags.get(TAG_MODEL_URI):
        return run.data.tags[TAG_MODEL_URI]
    with temporary_folder() as tmp:
        folder = tracker.download_adapter(run_id, Path(tmp))
        metadata = read_metadata(folder, f"run {run_id}")
        base = metadata["base_model"]
        prep = metadata.get("preprocessing") or {}
        with interrupts.deferred():  # in the run's experiment, so its files sit with the run's artifacts
            model = tracker.client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                                       params=dict(run.data.params), model_type="hpo-peft adapter")
        with using_store(tracker.uri), _quiet("mlflow.pyfunc", "mlflow.models"):
            info = Model.log(
                artifact_path=None, name=MODEL_NAME, model_id=model.model_id, flavor=mlflow.pyfunc, run_id=run_id,
                python_model=AdapterModel(),
                artifacts={ADAPTER_ARTIFACT: str(folder)}, signature=signature(metadata["categories"]),
                input_example=input_example(prep.get("height", 224), prep.get("width", 224)),
                pip_requirements=_requirements(),
                metadata={"hpo_peft_base_model": base, "hpo_peft_method": metadata["method"]["name"]},
                model_config={"base_model": _absolute(base["name_or_path"]), "device": "auto"},
            )
    tracker.set_tags(run_id, {TAG_MODEL_URI: info.model_uri})
    return info.model_uri


@contextmanager
def _quiet(*loggers: str):
    """MLflow's notes while logging (cloudpickle advice, input example validated) kept off the
    command's output; its warnings of a failed validation still show."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING if name == "mlflow.models" else logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextmanager
def using_store(uri: str):
    """MLflow's fluent API (Model.log, the registry resolving `models:/m-...`) reads the store from
    the process-wide tracking URI: point it at this study's store for the call, then back."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # MLflow keeps its URI there too: it is the user's setting
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None: unset again, not MLflow's computed default


def _absolute(name_or_path: str) -> str:
    """A local base model folder as an absolute path (the server may run elsewhere); hub ids as they are."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def register_model(tracker: Tracker, run_id: str, model_uri: str, name: str, alias: str = "best",
                   force_alias: bool = False) -> dict:
    """Register the logged model as a version of `name` (a run registered before keeps its version)
    and move `alias` to it if its trial's selection score beats the one `alias` points at (ties: the
    lower validation loss), or with `force_alias`. Returns the version, whether it is new, whether
    the alias moved, the version it points at, and `note`: one line saying why it stayed or that it moved to a worse trial."""
    client = tracker.client
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="hpo-peft adapter as a pyfunc model (see the README)")
    mine = sorted((v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id),
                  key=lambda v: int(v.version))
    if mine:
        version = int(mine[0].version)
    else:
        with using_store(tracker.uri):
            created = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_uri.removeprefix("models:/"))
        version = int(created.version)
    describe_version(tracker, name, version, run_id)
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    result = {"version": version, "new_version": not mine, "alias_moved": False, "note": None,
              "alias_version": int(current.version) if current is not None else None}
    if current is not None and int(current.version) == version:
        return result
    new_key = _selection_key(tracker, run_id)
    old_key = _selection_key(tracker, current.run_id) if current is not None and current.run_id else None
    better = old_key is None or (new_key is not None and new_key < old_key)
    if better or force_alias:
        client.set_registered_model_alias(name, alias, version)
        result.update(alias_moved=True, alias_version=version)
    if old_key is not None and not better:
        old, new = -old_key[0], (-new_key[0] if new_key else None)
        tie = new == old  # the selection's tie-break: the lower validation loss
        if force_alias:
            result["note"] = (f"alias {alias!r} moved by --force-alias to version {version} (run {run_id}), a worse "
                              f"trial than version {current.version} (run {current.run_id}, selection score "
                              f"{_score(new)} {'=' if tie else '<'} {_score(old)}{', validation loss higher' if tie else ''})")
        else:
            result["note"] = (f"alias {alias!r} stays on version {current.version} (run {current.run_id}, selection "
                              f"score {_score(old)} {'=' if tie else '>'} {_score(new)}{', validation loss lower' if tie else ''}); "
                              "--force-alias moves it")
    return result


def describe_version(tracker: Tracker, name: str, version: int, run_id: str) -> None:
    """The version's description (the registry's page): its study and run, the selection and test
    scores, and the label budget (`run_story.version_description`)."""
    from hpo_peft.tracking.run_story import version_description
    from hpo_peft.tracking.tracker import TAG_STUDY

    run = tracker.client.get_run(run_id)
    text = version_description(run.data.tags.get(TAG_STUDY), run.info.run_name, run_id, run.data.metrics, run.data.params)
    tracker.client.update_model_version(name, str(version), description=text)


def _selection_key(tracker: Tracker, run_id: str) -> tuple[float, float, int] | None:
    """A run's place in the selection (selection.py): higher score, then lower validation loss; a
    study's ensemble (ensemble_run.py) ranks just ahead of its best member."""
    from hpo_peft.tracking.ensemble_run import TAG_TOP_RUN
    from hpo_peft.tracking.run_story import OBJECTIVE

    try:
        run = tracker.client.get_run(run_id)
    except MlflowException:
        return None
    if top := run.data.tags.get(TAG_TOP_RUN):
        key = _selection_key(tracker, top)
        return None if key is None else (key[0], key[1], 0)
    if OBJECTIVE not in run.data.metrics:
        return None
    return -run.data.metrics[OBJECTIVE], run.data.metrics.get("final_val_loss", float("inf")), 1


def _score(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f}"


def adapter_label(model: str) -> str | None:
    """How errors name the adapter that `model` gives: `run ID`, the URI; None for a folder (its path)."""
    if Path(model).is_dir():
        return None
    return f"run {model}" if RUN_ID.match(model) else model


def fetch_adapter(model: str, tracking_uri: str | None, destination: Path) -> Path:
    """The adapter folder that `model` names: a folder (an adapter, or a saved pyfunc model), a
    model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/PATH`) or a trial's run id."""
    folder = Path(model)
    if folder.is_dir():
        return _adapter_in(folder, model)
    if "://" not in model and ":/" not in model and not RUN_ID.match(model):
        raise UserError(f"MODEL: {model!r} is neither a folder, a models:/NAME@ALIAS URI nor an MLflow run id")
    tracker = Tracker(tracking_uri, experiment="", create=False)
    if RUN_ID.match(model):
        tracker.check_has_adapter(model)
        return tracker.download_adapter(model, destination)
    try:
        with using_store(tracker.uri):
            local = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(destination))
    except (MlflowException, OSError) as err:
        from mlflow.environment_variables import MLFLOW_REGISTRY_URI

        where = redact(tracker.uri)
        if model.startswith("models:/") and (registry := MLFLOW_REGISTRY_URI.get()):  # MLflow reads it too
            where += f" (model registry {redact(registry)}, from MLFLOW_REGISTRY_URI)"
        raise UserError(f"MODEL: {model} not found in {where} ({' '.join(str(err).split())[:300]})") from None
    return _adapter_in(Path(local), model)


def _adapter_in(folder: Path, given: str) -> Path:
    for candidate in (folder, folder / "artifacts" / ADAPTER_ARTIFACT, folder / ADAPTER_ARTIFACT):
        if (candidate / METADATA_FILE).is_file():
            return candidate
    raise UserError(f"MODEL: {given}: holds no hpo-peft adapter (no {METADATA_FILE})")
