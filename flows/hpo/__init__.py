"""Hyperparameter search: an Optuna study whose trials are cached training runs (`kiln hpo CONFIG`).

- `config.py`  the `hpo:` section of a pipeline config (search space, sampler, budgets, objective, pruner,
               storage); pydantic only, so the pipeline config imports it cheaply
- `space.py`   the search space checked against the pipeline before any trial, values applied by path,
               which stages a trial runs and which all trials share
- `study.py`   the Optuna side: storage, sampler, pruner, owners of running trials, retries of killed ones,
               the objective's value and the validation values read back from artifacts
- `report.py`  the trials table, best.yaml, the plots
- `flow.py`    the `kiln-hpo` flow and its `kiln-hpo-trial` subflows
"""
