"""Training loops, one per model family, on shared machinery in :mod:`cxrlib.train.engine`.

- ``engine``: distributed context (``torchrun``), seeded data loaders, atomic checkpoints
  that load with ``weights_only=True``, a JSON-lines metric log, progress bars, AMP helpers.
- ``segmentation``: U-Net lung segmentation (Dice + cross-entropy), resumable, DDP-ready.
- ``cyclegan``: unpaired image translation (Normal / Pneumonia -> COVID-19), LSGAN + cycle +
  identity losses, image pools, resumable, DDP-ready; ``translate`` makes the synthetic images.
"""
