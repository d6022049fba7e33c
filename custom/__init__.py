"""Promptable 3D medical image segmentation (SAM-Med3D) for the MONAI bundle in ``bundle/``."""
