"""Reports for people: a self-contained report.html and PNG plots of a run, a study or a compare.

Each module takes what another command already wrote (metrics.jsonl, an Optuna storage, the
figures of `eval --compare`) and draws it; nothing here trains, tunes or profiles. matplotlib and
optuna are imported inside functions, so importing this package costs nothing.
"""
