"""Models: the lung-segmentation U-Net (``unet``); generators, discriminators and classifiers live beside it."""
