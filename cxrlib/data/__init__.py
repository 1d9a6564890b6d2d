"""Data: phantom cohorts, real-dataset adapters, the manifest, image I/O, transforms, Datasets."""
