"""The notebook stages: one module per numbered notebook (``NN_name.ipynb`` -> ``cxrlib.stages.name``)."""
