"""Analysis of trained classifiers (notebook 05): feature spaces and saliency maps.

- :mod:`cxrlib.explain.embed`: penultimate features (cached), UMAP / PCA, separation of real
  and synthetic images measured in feature space;
- :mod:`cxrlib.explain.cam`: Grad-CAM, Grad-CAM++, EigenCAM and ScoreCAM through
  pytorch-grad-cam, per-architecture target layers, grey-image overlays, probabilistic
  patch Grad-CAM;
- :mod:`cxrlib.explain.saliency`: lung overlap, pointing game and lesion energy against
  random-map and centre-prior baselines; ROAD and CAM-multiplied confidence change;
- :mod:`cxrlib.stages.umap_gradcam`: which classifier, rows and masks the notebook uses.

Submodules are imported on use (umap-learn alone takes seconds to import).
"""
