"""Training data: the tile index (index), which tiles a batch holds (sampling), augmentation
and input normalisation (augment), and batches of pixels per step (dataset)."""

from madflow.data.augment import IMAGENET_MEAN, IMAGENET_STD, Augmenter, normalise, pixels_to_input, tile_standardise
from madflow.data.dataset import MADBatchDataset, interp_views
from madflow.data.index import TileIndex, load_tables
from madflow.data.sampling import choose_group, group_weights, parse_pair, sample_batch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Augmenter", "normalise", "pixels_to_input", "tile_standardise",
           "MADBatchDataset", "interp_views", "TileIndex", "load_tables", "choose_group", "group_weights",
           "parse_pair", "sample_batch"]
