"""Dataset sources and loaders.

Small datasets (MNIST, Fashion-MNIST, CIFAR-10/100, SVHN, synthetic) are read from their official files into one
uint8 tensor on the training device and shuffled, cropped and flipped there in batches; ImageNet-style folders stream
through a DataLoader with workers. Either way the engine sees the same interface:

    data = build_data(cfg.dataset, device=torch.device("cuda"), seed=0, batch_size=128)
    for batch in data.train.epoch(epoch):           # Batch(x in [0,1], y, index, crop, flip)
        ...
    for x, y in data.test.batches(500, n=1000):     # fixed order, no augmentation
        ...
"""

from .augment import apply_augmentation
from .build import Data, DatasetInfo, build_data
from .errors import DataError
from .loader import Batch, EvalSet, TrainLoader

__all__ = ["Batch", "Data", "DataError", "DatasetInfo", "EvalSet", "TrainLoader", "apply_augmentation", "build_data"]
