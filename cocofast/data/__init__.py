"""Data for cocofast: the built-in synthetic pathology set and folders of real image/mask pairs."""
from .folder import FolderDataset
from .synthetic import SyntheticPathology, make_patch
from .transforms import joint_flip

__all__ = ["FolderDataset", "SyntheticPathology", "joint_flip", "make_patch"]
