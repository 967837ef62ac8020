"""Links into the MLflow UI that open the right view: the experiment's run table in the
machine-learning view (not the GenAI overview), sorted by the selection (`selection_rank`
ascending: the pick first, ties broken as `selection.select_best` breaks them), and a run's page.

MLflow 3's UI reads these query parameters of its run-table route `#/experiments/ID/runs` (the bare
`#/experiments/ID` redirects there and drops them): `searchFilter`,
`orderByKey`, `orderByAsc`, `startTime`, `lifecycleFilter`, `modelVersionFilter`,
`datasetsFilter` (the run table's search facets), and `workflowType` (`machine_learning` or
`genai`). A sort key is `metrics.` + the metric name in backquotes. Which columns show is the
UI's own state (kept in the browser), not the link's: a run's state is in its name.

A tracking server's URI is its UI's address; a local store is opened with `mlflow ui` (default
http://127.0.0.1:5000), and the printed lines say how to start it.
"""

from __future__ import annotations

import shlex
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from hpo_peft.core import stores
from hpo_peft.tracking.run_story import RANK

DEFAULT_UI = "http://127.0.0.1:5000"
ML_VIEW = {"workflowType": "machine_learning"}


def ui_base(tracking_uri: str) -> str:
    """A tracking server's own address (scheme, host, port and path prefix; never its credentials,
    query or fragment); for a local store, where `mlflow ui` serves by default."""
    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)
        host = parts.netloc.rpartition("@")[2]  # user:password@ stays out of printed links
        return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    return DEFAULT_UI


def start_hint(tracking_uri: str) -> str | None:
    """How to open a local store in the UI (the command, ready to paste); None for a server (its
    address is the UI)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {shlex.quote(stores.redact(tracking_uri))}"


def sort_key(metric: str) -> str:
    return f"metrics.`{metric}`"


def run_table_url(base: str, experiment_id: str, metric: str = RANK, ascending: bool = True) -> str:
    """The experiment's runs in the selection's order, the pick first (sorted by a metric, the UI
    lists child runs flat; runs without it, pruned and failed trials and the session parents, come
    last)."""
    order = {"orderByKey": sort_key(metric), "orderByAsc": "true" if ascending else "false"}
    query = urlencode({**ML_VIEW, **order}, quote_via=quote)
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{urlencode(ML_VIEW)}"


def study_links(tracking_uri: str | None, study_name: str, run_id: str | None) -> dict[str, str]:
    """{"run_table": ..., "best_run": ...} for a study's experiment in the store (read only)."""
    from hpo_peft.tracking.tracker import Tracker

    return tracker_links(Tracker(tracking_uri, experiment=study_name, create=False), run_id)


def tracker_links(tracker, run_id: str | None) -> dict[str, str]:
    """The same links for an open `Tracker`'s experiment (e.g. `compare`'s, and its parent run)."""
    base = ui_base(tracker.uri)
    links = {"run_table": run_table_url(base, tracker.experiment_id)}
    if run_id:
        links["best_run"] = run_url(base, tracker.experiment_id, run_id)
    if hint := start_hint(tracker.uri):
        links["start_ui"] = hint
    return links


def print_links(links: dict[str, str], run_label: str = "best run") -> None:
    hint = links.get("start_ui")
    print(f"MLflow UI{f' (start it with: {hint})' if hint else ''}:")
    print(f"  run table: {links['run_table']}")
    if "best_run" in links:
        print(f"  {run_label}: {links['best_run']}")
