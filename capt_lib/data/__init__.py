"""Datasets, few-shot sampling, the base/novel split, image styles and transforms."""

from capt_lib.data.dataset import ClassificationDataset
from capt_lib.data.fashion_mnist import FASHION_MNIST_CLASSNAMES, load_fashion_mnist
from capt_lib.data.fewshot import sample_few_shot
from capt_lib.data.splits import split_base_novel

__all__ = [
    "ClassificationDataset",
    "FASHION_MNIST_CLASSNAMES",
    "load_fashion_mnist",
    "sample_few_shot",
    "split_base_novel",
]
