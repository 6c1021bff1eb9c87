from .configuration_lavin import LavinConfig
from .modeling_lavin import ImageTokenMismatchError, LavinForConditionalGeneration, LavinPreTrainedModel

__all__ = ["ImageTokenMismatchError", "LavinConfig", "LavinForConditionalGeneration", "LavinPreTrainedModel"]
