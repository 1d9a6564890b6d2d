"""Run the numbered notebooks in order with papermill.

Profiles are the one table of run sizes in the project: ``quick`` is the CI smoke size,
``default`` the CPU demo, ``full`` paper scale for a GPU, and ``real-cpu`` the real-data
run on a CPU. Each profile maps a notebook stem to the parameters it receives on top of
the common ones (``DATASET``, ``PROFILE``, ``SEED``, ``RUN_DIR``, ``DEVICE``). A notebook
reads the value for its own stage from ``cxrlib.pipeline.PROFILES`` too, so running a
notebook by hand in JupyterLab with ``PROFILE = "quick"`` gives the same sizes.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxrlib import config

#: Run sizes per profile and notebook stage. Budgets (CPU, 2 cores): quick <= 5 min for all
#: notebooks together; default <= 35 min (data 1, segmentation 5, CycleGAN 15, classifiers 10,
#: analysis 3).
PROFILES: dict[str, dict[str, dict]] = {
    "quick": {
        # 30 patients: the smallest seed-0 cohort with COVID-19 patients in val and test (24 had none in val)
        "01_data_assembly": {"N_PATIENTS": 30, "IMAGE_SIZE": 128, "UPDATE_FIGURES": False},
        "02_lung_segmentation": {"IMAGE_SIZE": 64, "BASE_CHANNELS": 4, "DEPTH": 3, "EPOCHS": 2,
                                 "BATCH_SIZE": 8, "MAX_STEPS_PER_EPOCH": 3, "N_BOOT": 200},
        "03_cyclegan": {"IMAGE_SIZE": 32, "NGF": 8, "NDF": 8, "UNET_DEPTH": 3, "N_LAYERS_D": 1, "EPOCHS": 1,
                        "EPOCHS_DECAY": 0, "BATCH_SIZE": 4, "MAX_STEPS_PER_EPOCH": 2, "JUDGE_EPOCHS": 1,
                        "N_BOOT": 50, "UPDATE_FIGURES": False},
        # one task, two conditions, one seed, 2 x 4 steps at 32 px, plus the controls: ~20-40 s
        "04_classifiers": {"TASKS": ["normal_vs_covid"], "CONDITIONS": ["real", "real_gnc_gpc"], "RATIOS": [5],
                           "N_SEEDS": 1, "IMAGE_SIZE": 32, "EPOCHS": 2, "STEPS_PER_EPOCH": 4, "BATCH_SIZE": 8,
                           "N_BOOT": 200, "UPDATE_FIGURES": False},
        # PCA only (UMAP's first call compiles for ~30 s), a few images and resamples: seconds; every COVID-19
        # test image is scored (the quick classifiers get few right)
        "05_umap_gradcam": {"EMBEDDING": "pca", "MAX_SYNTHETIC": 40, "N_GALLERY": 2, "SALIENCY_IMAGES": "all",
                            "MAX_CAM_IMAGES": 6,
                            "SALIENCY_SIZE": 128, "N_RANDOM_MAPS": 3, "ROAD_PERCENTILES": [50], "CV_FOLDS": 3,
                            "PATCH_K": 4, "N_BOOT": 100, "UPDATE_FIGURES": False},
        # a 16 px denoiser for 2 steps, 2-step samplers, 1-epoch judges: seconds
        "06_diffusion_reader_study": {"IMAGE_SIZE": 16, "CHANNELS": [8, 16], "EPOCHS": 1, "MAX_STEPS_PER_EPOCH": 2,
                                      "BATCH_SIZE": 8, "N_SAMPLES_PER_CLASS": 4, "DDIM_STEPS": 2, "JUDGE_EPOCHS": 1,
                                      "TEXT_SEG_EPOCHS": 1, "TEXT_SEG_STEPS": 2, "TEXT_EVAL_IMAGES": 2,
                                      "INPAINT_STEPS": 2, "READER_IMAGES": 8, "N_BOOT": 50, "UPDATE_FIGURES": False},
    },
    "default": {
        "01_data_assembly": {"N_PATIENTS": 400, "IMAGE_SIZE": 256},
        # 128 px input (logits resized to the 256 px masks), width 8, 5 x 50 steps of 8 images:
        # under three passes over the ~720 training images; test Dice ~0.97, ~1.5-3 min of training.
        "02_lung_segmentation": {"IMAGE_SIZE": 128, "BASE_CHANNELS": 8, "DEPTH": 4, "EPOCHS": 5,
                                 "BATCH_SIZE": 8, "LEARNING_RATE": 2e-3, "MAX_STEPS_PER_EPOCH": 50},
        # U-Net gf 16 (depth 3) at 48 px, 2-layer PatchGAN (34 px patches), batch 4, lr 2e-4, weak identity
        # loss, 8 + 7 epochs of 66 steps = 990 steps (~15 passes over the ~260 images per class), one CPU
        # thread (two threads on 2 busy cores were ~7x slower): ~145 s of CPU time per translator; judges
        # 10 epochs each (validation AUC ~0.96-0.97). Measured: 218 + 303 s of training, 12 min for the
        # notebook on 2 CPU cores shared at load 3-5.
        "03_cyclegan": {"IMAGE_SIZE": 48, "GENERATOR": "unet", "NGF": 16, "NDF": 32, "UNET_DEPTH": 3,
                        "N_LAYERS_D": 2, "EPOCHS": 8, "EPOCHS_DECAY": 7, "BATCH_SIZE": 4, "LEARNING_RATE": 2e-4,
                        "LAMBDA_ID": 0.1, "MAX_STEPS_PER_EPOCH": 66, "JUDGE_EPOCHS": 10, "NUM_THREADS": 1},
        # small CNN at 48 px, 20 epochs x 16 steps of 16 images per cell, 2 binary tasks x 5 conditions x
        # 3 seeds at 1:20 (30 cells) + 3 control models: ~15-25 s per cell on 2 CPU cores, depending on load
        "04_classifiers": {"TASKS": ["normal_vs_covid", "pneumonia_vs_covid"], "ARCHS": ["small_cnn"],
                           "RATIOS": [20], "N_SEEDS": 3, "IMAGE_SIZE": 48, "EPOCHS": 20, "STEPS_PER_EPOCH": 16,
                           "BATCH_SIZE": 16, "LEARNING_RATE": 3e-3, "NUM_THREADS": 1},
        # UMAP of ~1,300 images in two feature spaces, 4 CAM methods on up to 30 COVID-19 test images with
        # ROAD at 3 percentiles: ~2.5 min on 2 busy CPU cores (155 s measured at load 4, 82 s of CPU)
        "05_umap_gradcam": {"EMBEDDING": "umap", "MAX_SYNTHETIC": 300, "MAX_CAM_IMAGES": 30, "N_GALLERY": 4,
                            "SALIENCY_SIZE": 256, "ROAD_PERCENTILES": [25, 50, 75], "NUM_THREADS": 1},
        # pixel-space v-prediction denoiser (16, 32, 64) at 32 px, 8 x 45 steps of 16 images (~3.5-4 min of
        # training on one busy thread; 5 epochs left half the normal samples called COVID-19), 32 samples per
        # class with 10 DDIM steps at guidance 4 (guidance 2 and 3: 38% / 21% of 24 normal samples called
        # COVID-19, 4: 4%), judges at 32 px, width-4 text U-Net; one thread (two threads on a shared 2-core CPU
        # ran ~10x slower)
        "06_diffusion_reader_study": {"IMAGE_SIZE": 32, "CHANNELS": [16, 32, 64], "EPOCHS": 8,
                                      "MAX_STEPS_PER_EPOCH": 50, "BATCH_SIZE": 16, "LEARNING_RATE": 1.5e-3,
                                      "PREDICTION_TYPE": "v_prediction", "N_SAMPLES_PER_CLASS": 32,
                                      "DDIM_STEPS": 10, "GUIDANCE_SCALE": 4.0, "JUDGE_EPOCHS": 10,
                                      "NUM_THREADS": 1},
    },
    "full": {
        "01_data_assembly": {"N_PATIENTS": 4000, "IMAGE_SIZE": 256},
        "02_lung_segmentation": {"IMAGE_SIZE": 256, "BASE_CHANNELS": 16, "DEPTH": 4, "EPOCHS": 30,
                                 "BATCH_SIZE": 16, "LEARNING_RATE": 1e-3, "MAX_STEPS_PER_EPOCH": 0},
        # the paper's translators: U-Net gf 32, 70x70 PatchGAN df 64, batch 16, 50 + 50 epochs at 256 px (GPU)
        "03_cyclegan": {"IMAGE_SIZE": 256, "GENERATOR": "unet", "NGF": 32, "NDF": 64, "UNET_DEPTH": 8,
                        "N_LAYERS_D": 3, "EPOCHS": 50, "EPOCHS_DECAY": 50, "BATCH_SIZE": 16, "LAMBDA_ID": 1.0,
                        "MAX_STEPS_PER_EPOCH": 0, "JUDGE_ARCH": "resnet18", "JUDGE_EPOCHS": 20},
        # Zunair & Hamza's grid at 224 px on a GPU: 3 tasks x 5 architectures x 5 conditions x 3 ratios x
        # 3 seeds; 30 epochs capped at 80 steps of 32 images (about one pass over the real training set)
        "04_classifiers": {"TASKS": ["normal_vs_covid", "pneumonia_vs_covid", "three_class"],
                           "ARCHS": ["small_cnn", "resnet18", "resnet50", "densenet121", "vgg16"],
                           "RATIOS": [10, 20, 50], "N_SEEDS": 3, "IMAGE_SIZE": 224, "EPOCHS": 30,
                           "STEPS_PER_EPOCH": 80, "BATCH_SIZE": 32, "LEARNING_RATE": 1e-3, "NUM_THREADS": 0,
                           "LUNG_CONTROL_MODES": ["whole", "lung_masked", "lungs_removed"]},
        # every test COVID-19 image the classifier got right (up to 500), ROAD at nine percentiles
        "05_umap_gradcam": {"EMBEDDING": "umap", "MAX_SYNTHETIC": 2000, "MAX_CAM_IMAGES": 500, "N_GALLERY": 6,
                            "SALIENCY_SIZE": 256, "ROAD_PERCENTILES": [10, 20, 30, 40, 50, 60, 70, 80, 90],
                            "NUM_THREADS": 0},
        # the latent model (GPU): AutoencoderKL 128 px -> 32 px latents, attention denoiser, 100 epochs
        "06_diffusion_reader_study": {"IMAGE_SIZE": 128, "LATENT": True, "VAE_EPOCHS": 20,
                                      "CHANNELS": [64, 128, 256, 256], "ATTENTION": True, "EPOCHS": 100,
                                      "MAX_STEPS_PER_EPOCH": 0, "BATCH_SIZE": 32, "LEARNING_RATE": 2e-4,
                                      "N_SAMPLES_PER_CLASS": 500, "DDIM_STEPS": 50, "JUDGE_EPOCHS": 20,
                                      "TEXT_SEG_CHANNELS": 16, "TEXT_SEG_DEPTH": 4, "TEXT_SEG_EPOCHS": 10,
                                      "TEXT_SEG_STEPS": 200, "TEXT_EVAL_IMAGES": 200, "INPAINT_STEPS": 50,
                                      "NUM_THREADS": 0},
    },
    "real-cpu": {
        "01_data_assembly": {"IMAGE_SIZE": 256, "UPDATE_FIGURES": False},
        # SEG_DATA (a COVID-19 Radiography Database folder) is given at run time: --param SEG_DATA=...
        # 400 training patients (15% of them for validation), 100 test patients, 20 full epochs
        # at 128 px (metrics on the 256 px masks): test Dice ~0.96 after ~5-8 min of CPU training.
        "02_lung_segmentation": {"N_TRAIN_PATIENTS": 400, "N_TEST_PATIENTS": 100, "VAL_FRACTION": 0.15,
                                 "IMAGE_SIZE": 128, "BASE_CHANNELS": 8, "DEPTH": 4, "EPOCHS": 20,
                                 "BATCH_SIZE": 8, "LEARNING_RATE": 2e-3, "MAX_STEPS_PER_EPOCH": 0},
        # 128 px (the real-data size), U-Net gf 16 with 5 levels, 3-layer PatchGAN (70 px patches),
        # lr 2e-4, identity 0.5, 2 + 2 epochs of 80 steps = 320 steps of 4 pairs per translator, one thread:
        # ~18 min of training for both translators on 2 CPU cores shared at load 3-7 (realdata recipe).
        # Real images have no lesion masks, so no lesion / anatomy check.
        "03_cyclegan": {"IMAGE_SIZE": 128, "GENERATOR": "unet", "NGF": 16, "NDF": 32, "UNET_DEPTH": 5,
                        "N_LAYERS_D": 3, "EPOCHS": 2, "EPOCHS_DECAY": 2, "BATCH_SIZE": 4, "LEARNING_RATE": 2e-4,
                        "LAMBDA_ID": 0.5, "MAX_STEPS_PER_EPOCH": 80, "JUDGE_EPOCHS": 8, "NUM_THREADS": 1,
                        "UPDATE_FIGURES": False},
        # resnet18 (random init offline) at 96 px, real only vs real + G_NC + G_PC, both binary tasks, 3 seeds
        # at 1:20: 12 cells of 6 epochs x 16 steps of 16 images, plus the site and lung controls
        "04_classifiers": {"TASKS": ["normal_vs_covid", "pneumonia_vs_covid"], "ARCHS": ["resnet18"],
                           "CONDITIONS": ["real", "real_gnc_gpc"], "RATIOS": [20], "N_SEEDS": 3,
                           "IMAGE_SIZE": 96, "EPOCHS": 6, "STEPS_PER_EPOCH": 16, "BATCH_SIZE": 16,
                           "LEARNING_RATE": 1e-3, "NUM_THREADS": 1, "UPDATE_FIGURES": False},
        # the default sizes without ScoreCAM (~11 s per image for ResNet-18 at 96 px on one thread,
        # benchmarks/bench_cam.py) and on 20 images (ROAD costs ~2 s per image and map there); real images
        # have no lesion masks, so lung overlap and faithfulness only; 303 s on the realdata recipe (load ~3)
        "05_umap_gradcam": {"EMBEDDING": "umap", "MAX_SYNTHETIC": 300, "MAX_CAM_IMAGES": 20, "N_GALLERY": 4,
                            "CAM_METHODS": ["gradcam", "gradcam++", "eigencam"], "SALIENCY_SIZE": 256,
                            "ROAD_PERCENTILES": [25, 50, 75], "NUM_THREADS": 2, "UPDATE_FIGURES": False},
        # 64 px pixel model, up to 60 epochs of <= 60 steps within a 28 min training budget (MAX_TRAIN_MINUTES:
        # training ends at the last epoch that fits); real images have no text masks, so the text section is
        # skipped (run the phantom notebook with REAL_IMAGES to see removal on real images)
        "06_diffusion_reader_study": {"IMAGE_SIZE": 64, "CHANNELS": [16, 32, 64, 64], "EPOCHS": 60,
                                      "MAX_TRAIN_MINUTES": 28, "MAX_STEPS_PER_EPOCH": 60, "BATCH_SIZE": 16,
                                      "LEARNING_RATE": 1.5e-3,
                                      "N_SAMPLES_PER_CLASS": 48, "DDIM_STEPS": 25, "JUDGE_EPOCHS": 10,
                                      "NUM_THREADS": 1, "UPDATE_FIGURES": False},
    },
}


def stage_params(profile: str, stage: str) -> dict:
    """Parameters of one notebook stage for a profile (a copy; raises on an unknown profile)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    return dict(PROFILES[profile].get(stage, {}))


def list_notebooks(directory: Path | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in run order."""
    directory = Path(directory) if directory is not None else config.notebooks_dir()
    return sorted(p for p in directory.glob("*.ipynb") if re.match(r"^\d\d_", p.name))


class PipelineError(RuntimeError):
    """A notebook failed; the message names the notebook and the failing cell."""


@dataclass
class StageResult:
    notebook: str
    output: str
    seconds: float
    ok: bool
    error: str = ""


@dataclass
class PipelineResult:
    run_dir: Path
    stages: list[StageResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)


def _describe_failure(exc: BaseException, notebook: Path) -> str:
    """Name the notebook and the failing cell of a papermill error (or any other error)."""
    cell_index = getattr(exc, "cell_index", None)  # set by papermill's PapermillExecutionError
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    if cell_index is not None:
        first = (str(getattr(exc, "source", "")).strip().splitlines() or [""])[0][:80]
        return f"{notebook.name}: cell {cell_index} ({first!r}) raised {ename}: {evalue}"
    return f"{notebook.name}: {ename}: {evalue}"


def run_pipeline(
    *,
    dataset: str = "phantom",
    profile: str = "default",
    run_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    notebooks: Sequence[str] | None = None,
    notebooks_dir: Path | None = None,
    extra_params: dict | None = None,
    kernel_name: str | None = None,
    progress: bool = True,
) -> PipelineResult:
    """Execute the numbered notebooks in order; stop at the first failure.

    ``notebooks`` filters by prefix or stem (e.g. ``["01", "02_lung_segmentation"]``).
    Executed copies go to ``run_dir/notebooks/``; each stage writes its own artifacts under
    ``run_dir/<stage>/``. A summary ``run_dir/pipeline.json`` records parameters and timings.
    Raises :class:`PipelineError` naming the notebook and failing cell.
    """
    import papermill as pm

    from cxrlib._kernel_client import RepollingKernelManager

    stage_params(profile, "")  # validate the profile name early
    run_dir = Path(run_dir) if run_dir is not None else config.runs_dir() / f"{dataset}-{profile}"
    run_dir = run_dir.resolve()
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = list_notebooks(notebooks_dir)
    if notebooks:
        selected = [p for p in selected if any(p.stem == n or p.stem.startswith(n) for n in notebooks)]
        if not selected:
            raise PipelineError(f"no notebook matches {list(notebooks)}")
    result = PipelineResult(run_dir=run_dir)
    summary_path = run_dir / "pipeline.json"
    for nb_path in selected:
        params = {
            "DATASET": dataset,
            "PROFILE": profile,
            "SEED": int(seed),
            "RUN_DIR": str(run_dir),
            "DEVICE": device,
        }
        params.update(stage_params(profile, nb_path.stem))
        params.update(extra_params or {})
        output = out_dir / nb_path.name
        start = time.perf_counter()
        print(f"[pipeline] {nb_path.name} ({profile}) ...", flush=True)
        try:
            pm.execute_notebook(
                str(nb_path),
                str(output),
                parameters=params,
                cwd=str(nb_path.parent),
                kernel_name=kernel_name,
                progress_bar=progress,
                log_output=False,
                # the stock client can wait for ever on a reply it missed (see cxrlib._kernel_client)
                kernel_manager_class=RepollingKernelManager,
            )
        except Exception as exc:  # papermill raises PapermillExecutionError for cell errors
            seconds = time.perf_counter() - start
            message = _describe_failure(exc, nb_path)
            result.stages.append(StageResult(nb_path.name, str(output), seconds, False, message))
            _write_summary(summary_path, result, dataset, profile, seed)
            raise PipelineError(f"{message}\n  executed copy with the traceback: {output}") from exc
        seconds = time.perf_counter() - start
        result.stages.append(StageResult(nb_path.name, str(output), seconds, True))
        print(f"[pipeline] {nb_path.name} done in {seconds:.0f} s", flush=True)
        _write_summary(summary_path, result, dataset, profile, seed)
    return result


def _write_summary(path: Path, result: PipelineResult, dataset: str, profile: str, seed: int) -> None:
    payload = {
        "dataset": dataset,
        "profile": profile,
        "seed": seed,
        "python": sys.version.split()[0],
        "stages": [s.__dict__ for s in result.stages],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def print_outputs(result: PipelineResult) -> None:
    """Tell the user where the executed notebooks, figures and metrics are."""
    run_dir = result.run_dir
    print(f"\nRun finished: {run_dir}")
    print(f"  executed notebooks: {run_dir / 'notebooks'}")
    for stage in result.stages:
        print(f"    {stage.notebook:35s} {stage.seconds:7.1f} s")
    metrics = sorted(run_dir.glob("*/metrics.json"))
    figures = sorted(run_dir.glob("*/*.png"))
    print("  metrics:")
    for m in metrics:
        print(f"    {m}")
    print(f"  figures: {len(figures)} under {run_dir}/<stage>/ ; README figures in {config.figures_dir()}")
