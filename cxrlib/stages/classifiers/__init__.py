"""Classifier experiments (notebook 04): the imbalance x synthetic-data grid and shortcut controls.

Zunair & Hamza (2021) ask whether CycleGAN-made COVID-19 images help a classifier that has
few real COVID-19 images. :func:`run_grid` answers it for every cell of
``task x architecture x condition x imbalance x seed``:

- tasks (:data:`TASKS`): Normal vs COVID-19, Pneumonia vs COVID-19, and the 3-class task
  Normal / Pneumonia / COVID-19;
- conditions (:data:`CONDITIONS`): ``real`` (real images only), ``real_oversample`` (real
  images, balanced oversampling and heavy augmentation, as Minaee et al. 2020),
  ``real_gnc`` (+ G_NC synthetic COVID-19), ``real_gnc_gpc`` (+ G_NC + G_PC),
  ``synthetic_only`` (synthetic COVID-19, no real COVID-19 image in training) and
  ``real_diffusion`` (+ COVID-19-conditioned samples of notebook 06's diffusion model; not in
  the default grid, since notebook 06 runs after notebook 04: asking for it makes notebook 04
  read notebook 06's manifest, the optional edge declared in :data:`cxrlib.stages.STAGES`);
- imbalance: ``ratios`` r give 1 real COVID-19 training image per r images of the largest
  other class of the task; whole COVID-19 *patients* are drawn in a seeded order (the same
  order for every ratio, task and condition of a seed, so smaller sets are nested in
  larger ones and conditions are compared on the same real images). Validation and test
  splits are never subsampled;
- seeds: each seed draws its own COVID-19 patients, initial weights, batches and augmentation.

Synthetic images only ever enter TRAINING sets, and only when their source image is in the
train split (the manifest leakage check runs first); generators without a source image
(:data:`SOURCELESS_GENERATORS`, the diffusion model) contribute their train-split rows. Every cell trains with
:func:`cxrlib.train.classifier.train_classifier`: the validation split chooses the epoch and
the operating threshold (Youden's J on the COVID-19 probability, also for the 3-class task);
the test split is predicted once and scored with 95 % bootstrap intervals over test
*patients*. A cell lives in ``run_dir/<task>/<arch>/<condition>/<imbalance>/seed<k>/``
(checkpoints, ``predictions.csv``, ``cell.json``); a cell whose ``cell.json`` matches the
current settings and data is loaded instead of retrained, so a re-opened notebook does not
retrain and a killed grid resumes.

Across seeds, :func:`summarize_over_seeds` and :func:`compare_conditions` report the
seed-mean of a metric with a bootstrap interval over test patients: every resample draws
test patients with replacement, scores each seed's model on that same resample at its own
validation threshold and averages over seeds. The interval covers test-set sampling, not
the spread between training runs, which is reported next to it (per-seed values).

Shortcut controls: :func:`site_control` trains the same classifier to predict the
acquisition site (or source) from the same images; :func:`lung_control` trains the disease
classifier on lungs-only and lungs-removed images (Maguolo & Nanni 2021; DeGrave et al.
2021).

Modules, one concern each: :mod:`~cxrlib.stages.classifiers.design` (tasks, conditions,
:class:`GridConfig`), :mod:`~cxrlib.stages.classifiers.training_sets`,
:mod:`~cxrlib.stages.classifiers.grid` (the runner), :mod:`~cxrlib.stages.classifiers.summaries`
(over seeds), :mod:`~cxrlib.stages.classifiers.comparisons` (paired) and
:mod:`~cxrlib.stages.classifiers.controls` (shortcut controls). Their public names are imported
here, so ``from cxrlib.stages import classifiers as ex; ex.run_grid(...)`` works.
"""

from cxrlib.stages.classifiers.comparisons import (
    compare_conditions,
)
from cxrlib.stages.classifiers.controls import (
    lung_control,
    lung_control_problem,
    site_control,
    site_target,
)
from cxrlib.stages.classifiers.design import (
    CONDITIONS,
    DEFAULT_CONDITIONS,
    POSITIVE,
    SOURCELESS_GENERATORS,
    TASKS,
    Condition,
    GridConfig,
    Task,
    grid_config_from_params,
    imbalance_name,
)
from cxrlib.stages.classifiers.grid import (
    SharedImages,
    grid_cells,
    predictions_frame,
    read_predictions,
    run_grid,
    score_predictions,
)
from cxrlib.stages.classifiers.summaries import (
    INTERVAL_METHOD,
    SEED_METRICS,
    ci_text,
    summarize_over_seeds,
)
from cxrlib.stages.classifiers.training_sets import (
    available_conditions,
    covid_patient_order,
    evaluation_rows,
    lung_masks_available,
    passing_lung_qc,
    real_rows,
    subsample_covid,
    synthetic_rows,
    task_problems,
    training_rows,
    training_set_table,
)

__all__ = [
    "CONDITIONS",
    "Condition",
    "DEFAULT_CONDITIONS",
    "GridConfig",
    "INTERVAL_METHOD",
    "POSITIVE",
    "SEED_METRICS",
    "SOURCELESS_GENERATORS",
    "SharedImages",
    "TASKS",
    "Task",
    "available_conditions",
    "ci_text",
    "compare_conditions",
    "covid_patient_order",
    "evaluation_rows",
    "grid_cells",
    "grid_config_from_params",
    "imbalance_name",
    "lung_control",
    "lung_control_problem",
    "lung_masks_available",
    "passing_lung_qc",
    "predictions_frame",
    "read_predictions",
    "real_rows",
    "run_grid",
    "score_predictions",
    "site_control",
    "site_target",
    "subsample_covid",
    "summarize_over_seeds",
    "synthetic_rows",
    "task_problems",
    "training_rows",
    "training_set_table",
]
