"""The data module the configs name as `main.DataModuleFromConfig`: datasets from `target`/`params` configs."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "predict")


class WrappedDataset(Dataset):
    """A torch Dataset over any object with `__len__` and `__getitem__`."""

    def __init__(self, dataset: Any):
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


def worker_init_fn(worker_id: int) -> None:
    """Give each loader worker its own numpy seed, and its own shard of an iterable dataset that lists its
    records in `valid_ids` (the original Txt2ImgIterableBaseDataset interface: num_records, valid_ids, sample_ids)."""
    info = get_worker_info()
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)
    dataset = info.dataset if info is not None else None
    if dataset is not None and hasattr(dataset, "valid_ids") and hasattr(dataset, "num_records"):
        share = dataset.num_records // info.num_workers
        dataset.sample_ids = dataset.valid_ids[worker_id * share:(worker_id + 1) * share]


class DataModuleFromConfig(pl.LightningDataModule):
    """Train/validation/test/predict datasets built from configs, served by DataLoaders with one batch size.

    Datasets are instantiated in `prepare_data` (so downloads happen once, on one process per node) and
    `setup`; `wrap=True` wraps each in WrappedDataset. Iterable datasets are never shuffled.
    """

    def __init__(self, batch_size: int, train: Any = None, validation: Any = None, test: Any = None,
                 predict: Any = None, wrap: bool = False, num_workers: int | None = None,
                 shuffle_test_loader: bool = False, use_worker_init_fn: bool = False,
                 shuffle_val_dataloader: bool = False):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.params.batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.use_worker_init_fn = use_worker_init_fn
        self.wrap = wrap
        given = dict(zip(SPLITS, (train, validation, test, predict)))
        self.dataset_configs = {split: cfg for split, cfg in given.items() if cfg is not None}
        self.shuffle = {"train": True, "validation": shuffle_val_dataloader, "test": shuffle_test_loader,
                        "predict": False}
        self.datasets: dict[str, Any] = {}
        self._prepared: dict[str, Any] = {}
        # Lightning looks for the hooks; only the splits that have a dataset get one
        for split, hook in (("train", "train_dataloader"), ("validation", "val_dataloader"),
                            ("test", "test_dataloader"), ("predict", "predict_dataloader")):
            if split in self.dataset_configs:
                setattr(self, hook, self._loader_fn(split))

    def _instantiate(self, split: str) -> Any:
        return instantiate_from_config(self.dataset_configs[split], path=f"data.params.{split}")

    def prepare_data(self) -> None:
        """Instantiate every dataset once, so datasets that download or index do it here."""
        for split in self.dataset_configs:
            self._prepared[split] = self._instantiate(split)

    def setup(self, stage: str | None = None) -> None:
        """Build (or reuse from prepare_data) the datasets and log their sizes."""
        for split in self.dataset_configs:
            if split in self.datasets:
                continue
            dataset = self._prepared.pop(split, None)
            dataset = self._instantiate(split) if dataset is None else dataset
            self.datasets[split] = WrappedDataset(dataset) if self.wrap else dataset
            size = len(self.datasets[split]) if hasattr(self.datasets[split], "__len__") else "?"
            logger.info("data: %s = %s, %s samples", split, type(dataset).__name__, size)

    def _loader_fn(self, split: str):
        def loader() -> DataLoader:
            return self._dataloader(split)
        loader.__name__ = f"{split}_dataloader"
        return loader

    def _dataloader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        iterable = isinstance(dataset, IterableDataset)
        init_fn = worker_init_fn if (iterable or self.use_worker_init_fn) else None
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          shuffle=self.shuffle[split] and not iterable, worker_init_fn=init_fn)
