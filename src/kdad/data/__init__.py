"""Datasets and image loading. Images come out as float32 (3, H, W) in [0, 1]; models normalise."""

from kdad.data.demo import DEFECT_TYPES, make_demo_dataset
from kdad.data.folder import FolderDataset
from kdad.data.mvtec import MVTecDataset, Sample, SampleDataset
from kdad.data.transforms import (
    IMAGE_EXTENSIONS,
    images_to_batch,
    list_images,
    load_image,
    load_image_and_mask,
    load_mask,
)

__all__ = [
    "DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "FolderDataset",
    "MVTecDataset",
    "Sample",
    "SampleDataset",
    "images_to_batch",
    "list_images",
    "load_image",
    "load_image_and_mask",
    "load_mask",
    "make_demo_dataset",
]
