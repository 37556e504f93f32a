"""Datasets (Fashion-MNIST, class-per-folder images) and extracted token codes."""

from .codes import CodeDataset, CodeWriter, check_codes, read_header, write_codes
from .extract import extract_codes
from .factory import make_dataset
from .fashion_mnist import CLASS_NAMES, FashionMNIST, class_index, find_fashion_mnist, load_fashion_mnist
from .folder import CorruptImageError, ImageFolder, center_crop_arr

__all__ = [
    "CLASS_NAMES", "FashionMNIST", "class_index", "find_fashion_mnist", "load_fashion_mnist",
    "ImageFolder", "CorruptImageError", "center_crop_arr",
    "CodeDataset", "CodeWriter", "check_codes", "read_header", "write_codes", "extract_codes", "make_dataset",
]
