"""Data for cocofast: the built-in synthetic pathology set and validated folders of real image/mask pairs."""
from .folder import DatasetError, FolderDataset
from .synthetic import SyntheticPathology, render_patch
from .tiling import axis_starts, patch_grid
from .transforms import joint_flip, random_joint_flip, resize_pair

__all__ = ["DatasetError", "FolderDataset", "SyntheticPathology", "axis_starts", "joint_flip", "patch_grid",
           "random_joint_flip", "render_patch", "resize_pair"]
