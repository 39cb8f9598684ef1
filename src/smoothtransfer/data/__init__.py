"""Datasets (in-memory uint8 tensors), batched augmentations, Gaussian noise and index subsets."""

from smoothtransfer.data.datasets import (
    DATASETS,
    DatasetInfo,
    ImageDataset,
    cache_dir,
    dataset_info,
    get_dataset,
    resolve_data_root,
)
from smoothtransfer.data.noise import MixedSigmaSampler, gaussian_noise
from smoothtransfer.data.subsets import evenly_spaced, k_shot_indices, train_val_split
from smoothtransfer.data.transforms import TRAIN_AUGMENTS, random_crop_flip

__all__ = [
    "DATASETS",
    "TRAIN_AUGMENTS",
    "DatasetInfo",
    "ImageDataset",
    "MixedSigmaSampler",
    "cache_dir",
    "dataset_info",
    "evenly_spaced",
    "gaussian_noise",
    "get_dataset",
    "k_shot_indices",
    "random_crop_flip",
    "resolve_data_root",
    "train_val_split",
]
