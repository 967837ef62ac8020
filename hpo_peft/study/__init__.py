"""The Optuna study: the session that runs trials (`session`), the search space and its portfolio start,
samplers, the study's identity, retry and compute budgets, and the checks before anything trains
(`preflight`).
"""

__all__ = ['session', 'search_space', 'portfolio', 'samplers', 'identity', 'trial_budget', 'compute_budget', 'preflight']
