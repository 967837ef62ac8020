"""The study's ensemble as an MLflow run (`search.ensemble: N`, fewshot/ensemble.py).

`evaluate` builds it when it scores the study's choice: the top N completed trials by the selection
order (`selection.ranks`, tie-breaks included) whose adapters are kept, downloaded, put side by side
in one ensemble folder and logged as the adapter of a new run named `ensemble of top N: trials a, b, c`
in the study's experiment. The run is made once per set of members (tagged with them); a later
`evaluate` with the same top trials scores the same run. Its adapter goes everywhere a trial's goes:
the pyfunc model, the registry, `predict`, the REST server.

Its validation score is scored as a trial's is (`selection.ensemble_score`): on each fold, the
members' class probabilities (each a model that never trained on that fold) averaged, the balanced
accuracy of their arg-max, the mean over folds. Like the best trial's, it flatters: the members
were chosen on the same images. The run records it as its objective, beside the members' selection
scores (their mean and range), and the test score once `evaluate` has it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from optuna.trial import FrozenTrial

from hpo_peft.core import interrupts
from hpo_peft.fewshot.artifacts import read_metadata
from hpo_peft.fewshot.ensemble import members_of, save_ensemble
from hpo_peft.tracking.recovery import RUN_ID_ATTR
from hpo_peft.tracking.run_story import OBJECTIVE, RANK
from hpo_peft.tracking.selection import ensemble_score, ranked
from hpo_peft.tracking.tracker import TAG_DROPPED, TAG_KIND, TAG_STUDY, Tracker, temporary_folder

KIND = "ensemble"
TAG_MEMBERS = "hpo_peft.ensemble_trials"  # the members' trial numbers, in rank order: "3,7,9"
TAG_SUPERSEDED = "hpo_peft.ensemble_superseded_by"  # an earlier ensemble: the run of the study's newer top trials
SUPERSEDED = 1_000_000  # an earlier ensemble's selection_rank: below every trial
TAG_TOP_RUN = "hpo_peft.ensemble_top_run"  # the best member's run: the registry ranks the ensemble by it
BUDGET_PARAMS = ("labels_per_class", "data.validation", "data.refit", "data.shots", "data.seed")  # the members' own


def members(tracker: Tracker, trials: list[FrozenTrial], size: int) -> list[FrozenTrial]:
    """The top `size` completed trials, in the selection's order, that still have their adapter."""
    chosen = []
    for trial in (t for t in ranked(trials) if t.user_attrs.get(RUN_ID_ATTR)):
        if len(chosen) == size:
            break
        if TAG_DROPPED not in tracker.get_run(trial.user_attrs[RUN_ID_ATTR]).data.tags:
            chosen.append(trial)
    return chosen


def ensemble_run(tracker: Tracker, study_name: str, trials: list[FrozenTrial], size: int) -> tuple[str, list[FrozenTrial]] | None:
    """The run holding the study's top `size` trials as one model, and its members; made if there is
    none for these members yet. None with fewer than two members (the best trial is the model)."""
    chosen = members(tracker, trials, size)
    if len(chosen) < 2:
        return None
    numbers = ",".join(str(t.number) for t in chosen)
    found = tracker.find_finished({TAG_KIND: KIND, TAG_STUDY: study_name, TAG_MEMBERS: numbers})
    if found:
        return found[0].info.run_id, chosen
    earlier = tracker.find_finished({TAG_KIND: KIND, TAG_STUDY: study_name})  # other members: superseded below
    scores = [t.value for t in chosen]
    with temporary_folder() as tmp:
        folders = []
        for trial in chosen:
            run_id = trial.user_attrs[RUN_ID_ATTR]
            folder = tracker.download_adapter(run_id, Path(tmp) / f"trial-{trial.number}")
            folders.append((folder, {"trial": trial.number, "run_id": run_id, "selection": trial.value,
                                     "label": f"run {run_id}"}))
        folder = save_ensemble(Path(tmp) / "ensemble", folders)
        methods = [m["method"]["name"] for m in members_of(read_metadata(folder))]  # a fixed method is no param
        with interrupts.deferred():  # no half-made run: created, filled and closed together
            top = chosen[0].user_attrs[RUN_ID_ATTR]
            run = tracker.client.create_run(tracker.experiment_id,
                                            run_name=f"ensemble of top {len(chosen)}: trials {numbers.replace(',', ', ')}",
                                            tags={TAG_KIND: KIND, TAG_STUDY: study_name, TAG_MEMBERS: numbers,
                                                  TAG_TOP_RUN: top})
            run_id = run.info.run_id
            budget = {k: v for k, v in tracker.get_run(top).data.params.items() if k in BUDGET_PARAMS}
            tracker.log_params(run_id, {**budget, "method": KIND, "ensemble.size": len(chosen), "ensemble.trials": numbers,
                                        "ensemble.methods": ",".join(methods)})
            own = ensemble_score(chosen)  # None: a member without out-of-fold predictions
            tracker.log_metrics(run_id, {"members_selection_mean": statistics.mean(scores),
                                         "members_selection_min": min(scores), "members_selection_max": max(scores),
                                         RANK: 0,  # the study's model: above its trials in the rank-sorted table
                                         **({OBJECTIVE: own} if own is not None else {})})
            tracker.log_adapter(run_id, folder)
            tracker.describe(run_id, note=describe(chosen, methods))
            tracker.end_run(run_id, "FINISHED")
            for run in earlier:  # below every trial in the rank-sorted table, and said why
                tracker.log_metrics(run.info.run_id, {RANK: SUPERSEDED})
                tracker.set_tags(run.info.run_id, {TAG_SUPERSEDED: run_id})
    return run_id, chosen


def describe(chosen: list[FrozenTrial], methods: list[str]) -> str:
    rows = "\n".join(f"| {place} | {t.number} | {method} | {t.value:.2f} |"
                     for place, (t, method) in enumerate(zip(chosen, methods), start=1))
    return (f"The study's top {len(chosen)} trials by selection score as one model: their class probabilities "
            "averaged, the prediction the most probable class. Its selection score is scored as a trial's: the "
            "members' out-of-fold probabilities averaged on each fold (chosen on the same images, it flatters as the "
            "best trial's does).\n\n| rank | trial | method | selection score |\n"
            f"|---|---|---|---|\n{rows}\n")


def ensemble_line(chosen: list[FrozenTrial]) -> str:
    """What `evaluate` says of the ensemble it scored."""
    scores = [t.value for t in chosen]
    return (f"the study's top {len(chosen)} trials as one model (search.ensemble): trials "
            f"{', '.join(str(t.number) for t in chosen)}, their selection scores {min(scores):.2f} to {max(scores):.2f} "
            f"(the best trial alone: --run-id {chosen[0].user_attrs[RUN_ID_ATTR]})")
