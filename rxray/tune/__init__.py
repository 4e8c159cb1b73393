"""`rxray tune`: hyperparameter search over SimCLR pretraining or classifier fine-tuning with Ray Tune.

Each trial is a Tune *function trainable* (:func:`rxray.tune.trial.run_trial`, Ray 2.60's pattern for
Ray Train under Tune): it builds the step's config from the fixed settings and the
trial's sampled values and calls the ordinary step (`rxray pretrain` or
`rxray finetune`) with its output under ``<out>/trials/<trial_id>``. The step's
TorchTrainer forwards every epoch's report to Tune (:func:`rxray.train.launch.fit`
adds Ray's ``TuneReportCallback`` inside a trial), so ASHA can stop weak trials
after any epoch.

Objectives, always maximised:

- ``pretrain``: ``probe_score``, the balanced accuracy of a plate-grouped linear
  probe on frozen embeddings after each epoch (:mod:`rxray.evaluate.probe`). The
  contrastive loss itself is no objective: it falls when augmentations get easier.
- ``finetune``: the validation PR-AUC (binary) or macro F1 (multiclass) that the
  classifier's own early stopping watches.

Trials start at most ``max_concurrent`` at a time, and fewer when the cluster
cannot hold that many: a TorchTrainer starts only when all of its workers fit, and
Ray Data needs a CPU left over to feed them. The trial function itself only waits
on its trainer and reserves memory but no CPU.

A search interrupted at any point resumes when the same command is run again
(``Tuner.restore`` from ``<out>/tune``): finished trials are kept as they are, an
interrupted one resumes from its step's last checkpoint.

Outputs under ``out``: ``results.parquet`` / ``results.csv`` (one row per trial:
sampled values, status, epochs, final and best objective), ``objective.png``,
``best_config.yaml`` (the best trial's full step config, which `rxray pretrain` /
`rxray finetune` take with ``--config``), ``config.yaml``, ``trials/`` and
``_manifest.json``.

The package reads in order: :mod:`~rxray.tune.plan` (the space, fixed values and
fit to the cluster), :mod:`~rxray.tune.trial` (one trial), :mod:`~rxray.tune.search`
(the Tuner and the step), :mod:`~rxray.tune.results` (the table, best trial, figure).
"""

from rxray.tune.results import PLOT_FILE, RESULTS_CSV, RESULTS_PARQUET
from rxray.tune.search import BEST_CONFIG, tune
from rxray.tune.trial import TRIAL_RECORD, TRIALS_DIR, run_trial

__all__ = ["BEST_CONFIG", "PLOT_FILE", "RESULTS_CSV", "RESULTS_PARQUET", "TRIAL_RECORD", "TRIALS_DIR", "run_trial",
           "tune"]
