from ..image_tokens import ImageTokenMismatchError
from .configuration_lavin import LavinConfig
from .modeling_lavin import LavinForConditionalGeneration, LavinPreTrainedModel

__all__ = ["ImageTokenMismatchError", "LavinConfig", "LavinForConditionalGeneration", "LavinPreTrainedModel"]
