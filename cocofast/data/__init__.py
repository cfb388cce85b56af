"""Data for cocofast: the built-in synthetic pathology set, validated folders of real image/mask pairs, and the
one rule (`normalise`) that turns stored pixels into network input for training and segmentation alike."""
from .folder import DatasetError, FolderDataset
from .normalise import Normalisation, image_stats, network_input, parse_normalisation, standardise, to_unit_range
from .synthetic import SyntheticPathology, render_patch
from .tiling import axis_starts, patch_grid
from .transforms import Augmentation, augment_pair, joint_flip, random_joint_flip, resize_pair

__all__ = ["Augmentation", "DatasetError", "FolderDataset", "Normalisation", "SyntheticPathology", "augment_pair",
           "axis_starts", "image_stats", "joint_flip", "network_input", "parse_normalisation", "patch_grid",
           "random_joint_flip", "render_patch", "resize_pair", "standardise", "to_unit_range"]
