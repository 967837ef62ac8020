"""The methods the few-shot benchmark adds reach a user's work like every other adapter: a study's
pick of each (CoOp, KgCoOp, Tip-Adapter, Tip-Adapter-F, LoRA with DoRA) is scored by `evaluate`
from its MLflow artifacts alone, registered as a pyfunc model, and `predict` on the test table
(through the registry) gives `evaluate`'s own metrics; the pyfunc model loaded by MLflow gives the
same probabilities as `predict`'s CSV."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import mlflow
import pandas as pd
import pytest
from conftest import write_demo_config

from hpo_peft.app.cli import main

CASES = {  # name -> (method, its options)
    "coop": ("coop", {}),
    "kgcoop": ("kgcoop", {}),
    "tip_adapter": ("tip_adapter", {}),
    "tip_adapter_f": ("tip_adapter_f", {}),
    "dora": ("lora", {"use_dora": True}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_new_methods_pick_is_evaluated_registered_and_predicted_alike(demo_kit, tmp_path, capsys, case):
    method, options = CASES[case]
    search = {"n_trials": 1, "sampler": {"name": "random"}, "pruner": {"name": "none"},
              "params": {"method": method, "max_epochs": 2}}
    path = write_demo_config(demo_kit, tmp_path / "study.yaml", search=search, methods={method: options},
                             data={"shots": 4, "val_shots": 4})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    where = ["--study-name", case, "--storage", str(tmp_path / "o.journal"), "--tracking-uri", uri]
    assert main(["study", "run", str(path), *where]) == 0
    capsys.readouterr()
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["evaluate", str(path), *where, "--register", f"new-{case}", "--json"]) == 0
    evaluated = json.loads(out.getvalue())
    assert evaluated["method"]["name"] == method
    assert {k: v for k, v in evaluated["method"]["config"].items() if k in options} == options

    model, table = f"models:/new-{case}@best", demo_kit / "sicapv2/partition/Test/Test.xlsx"
    csv = tmp_path / "predicted.csv"
    assert main(["predict", model, "--table", str(table), "--out", str(csv), "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert f"balanced accuracy {evaluated['balanced_accuracy']:.2f}% ± {evaluated['standard_error']:.2f}" in printed

    predicted = pd.read_csv(csv)
    categories = ["NC", "G3", "G4", "G5"]
    mlflow.set_tracking_uri(uri)
    try:
        served = mlflow.pyfunc.load_model(model).predict(pd.DataFrame({"path": predicted["image"].astype(str),
                                                                       "image": [None] * len(predicted)}))
    finally:
        mlflow.set_tracking_uri(None)
    assert list(served.columns) == categories
    assert served.to_numpy() == pytest.approx(predicted[[f"p_{c}" for c in categories]].to_numpy(), abs=1e-6)
    assert (predicted["predicted"] == [categories[i] for i in served.to_numpy().argmax(axis=1)]).all()
