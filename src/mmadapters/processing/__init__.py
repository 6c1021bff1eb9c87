from .images import InvalidImageError, load_image
from .processing_lavin import IGNORE_INDEX, LavinProcessor, PromptTooLongError

__all__ = ["IGNORE_INDEX", "InvalidImageError", "LavinProcessor", "PromptTooLongError", "load_image"]
