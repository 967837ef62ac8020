"""MLflow's side of a study: the tracker (runs, artifacts, tags), what a run records of a trial (`run_record`)
and how it tells it (`run_story`), which trial is best (`selection`, the rule the run table ranks by),
recovery of killed runs, artifact retention, links into the UI, the pyfunc model and test-split scoring of a
logged adapter.
"""

__all__ = ['tracker', 'run_record', 'run_story', 'selection', 'recovery', 'retention', 'ui_links', 'pyfunc_model', 'scoring']
