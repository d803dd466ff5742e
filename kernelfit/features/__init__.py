"""Feature maps for kernel interpolation: Gabor wavelets (gabor), random convolutions (randconv),
and an on-disk cache keyed by the data and config hashes (cache)."""

from .cache import FeatureCache, cached_transform, hash_array
from .gabor import GaborBank, GaborConfig, gabor_features
from .randconv import GramBlocks, RandConvConfig, RandConvFeatures, zca_whitening

__all__ = ["FeatureCache", "cached_transform", "hash_array", "GaborBank",
           "GaborConfig", "gabor_features", "GramBlocks", "RandConvConfig", "RandConvFeatures",
           "zca_whitening"]
