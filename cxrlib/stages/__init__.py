"""The notebook stages: the stage table, the stage runtime, and one module per numbered notebook.

One naming scheme: notebook ``notebooks/NN_name.ipynb``, run folder ``RUN_DIR/NN_name/``,
library module ``cxrlib.stages.name``. :mod:`cxrlib.stages.table` declares every stage once
(its folder, inputs and outputs); :mod:`cxrlib.stages.runtime` opens and closes a stage for
its notebook (``stage = open_stage("04", globals())`` ... ``stage.finish(metrics)``).
"""

from cxrlib.stages.runtime import StageRun, open_stage
from cxrlib.stages.table import (
    MANIFEST,
    METRICS,
    PARAMS,
    STAGES,
    Stage,
    get_stage,
    input_manifest,
    output_path,
    stage_dir,
    stage_path,
)

__all__ = ["MANIFEST", "METRICS", "PARAMS", "STAGES", "Stage", "StageRun", "get_stage", "input_manifest",
           "open_stage", "output_path", "stage_dir", "stage_path"]
