"""U-Hop memory retrieval (Algorithm 1) and the associative-memory retrieval experiments (Section 4.1).

``UHopRetriever(dim).fit(memories).retrieve(queries)`` and the baselines share one interface;
``python -m hopformer.retrieval`` (or ``hopformer-retrieval``) runs the sweeps.
"""

from .data import ImageSet, load_images
from .experiments import MODELS, SweepConfig, add_noise, mask_pixels, retrieval_errors, run_sweep
from .retriever import HopfieldRetriever, PolynomialRetriever, Retriever, UHopRetriever
from .stage_one import fit_feature_map, fit_feature_map_dense, row_normalize

__all__ = [
    "ImageSet", "load_images", "MODELS", "SweepConfig", "add_noise", "mask_pixels", "retrieval_errors", "run_sweep",
    "HopfieldRetriever", "PolynomialRetriever", "Retriever", "UHopRetriever", "fit_feature_map",
    "fit_feature_map_dense", "row_normalize",
]
