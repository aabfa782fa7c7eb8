"""TripoSR, re-implemented: image -> triplane scene codes -> density/colour field -> mesh.

Loads the published stabilityai/TripoSR checkpoint strictly. Imports nothing else of this project.
"""

from .config import TSRConfig, ViTConfig
from .preprocess import preprocess_image
from .system import TSR, MissingWeightsError

__all__ = ["TSR", "TSRConfig", "ViTConfig", "MissingWeightsError", "preprocess_image"]
