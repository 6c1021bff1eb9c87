from .base import IGNORE_INDEX, InvalidTextError, PromptTooLongError
from .images import InvalidImageError, load_image
from .processing_crome import CromeProcessor
from .processing_lavin import LavinProcessor

__all__ = [
    "CromeProcessor",
    "IGNORE_INDEX",
    "InvalidImageError",
    "InvalidTextError",
    "LavinProcessor",
    "PromptTooLongError",
    "load_image",
]
