"""The portfolio `search.start: portfolio` runs first: configurations of the demo space that did well
across the search benchmark's kits.

Learned by the search benchmark (benchmarks/search_replay.py) on four generated kits (4 classes with
a pre-trained model, 3 look-alike classes with an untrained one, 5 classes with a pre-trained one,
4 classes with another untrained one):
greedily, each next configuration is the one that brings the pick among the portfolio (by selection
score, as a study picks) closest to each kit's best unseen score. Checked leave-one-kit-out in
SOURCE (learned on three kits, measured on the fourth). Values use the space's bare keys; a study takes
each entry into its own space (search_space.portfolio_entries): only methods it draws, values clipped
into its ranges, the method's prior settings for keys an entry leaves out. Learned with tiny models:
a starting point for a search, not a recipe for PLIP-sized models.
"""

SOURCE = "benchmarks/results/search-2026-12-07-4-kits-grid210-b.md"

PORTFOLIO: list[dict] = [  # in the order they run
    {"method": "lora", "learning_rate": 0.004, "max_epochs": 30, "rank": 64, "b_init": "random"},
    {"method": "lora", "learning_rate": 0.004, "max_epochs": 30, "rank": 64, "b_init": "zeros"},
    {"method": "lora", "learning_rate": 0.0017, "max_epochs": 20, "rank": 4, "b_init": "zeros"},
    {"method": "lora", "learning_rate": 0.01, "max_epochs": 20, "rank": 4, "b_init": "random"},
    {"method": "full", "learning_rate": 0.0007, "max_epochs": 30},
    {"method": "lora", "learning_rate": 0.0017, "max_epochs": 30, "rank": 64, "b_init": "zeros"},
]
