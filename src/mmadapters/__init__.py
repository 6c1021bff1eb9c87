"""mmadapters: parameter-efficient vision-language adapters (LaVIN's MMA, CROME) as native transformers models.

Importing the package registers the models with the transformers Auto classes, so `AutoConfig`,
`AutoModelForImageTextToText`, `AutoProcessor` and `pipeline("image-text-to-text")` load our checkpoints.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .checkpoint_files import MissingWeightsError
from .modeling.adapters import CromeAdapterConfig, MMAdapterConfig
from .modeling.backbone_holders import BackboneInUseError
from .modeling.backbone_watch import BackboneChangedError
from .modeling.backbones import BackboneMismatchError, BackboneWeightsMissingError
from .modeling.crome import CromeConfig, CromeForConditionalGeneration
from .modeling.embedded import embedded_backbones
from .modeling.image_tokens import ImageTokenMismatchError
from .modeling.lavin import LavinConfig, LavinForConditionalGeneration
from .modeling.peft_on_top import PeftOnTopError, add_lora, adopt_peft_model
from .processing import (
    CromeProcessor,
    InvalidImageError,
    InvalidTextError,
    LavinProcessor,
    PromptTooLongError,
)

AutoConfig.register("lavin", LavinConfig)
AutoModel.register(LavinConfig, LavinForConditionalGeneration)
AutoModelForImageTextToText.register(LavinConfig, LavinForConditionalGeneration)
AutoProcessor.register(LavinConfig, LavinProcessor)
AutoConfig.register("crome", CromeConfig)
AutoModel.register(CromeConfig, CromeForConditionalGeneration)
AutoModelForImageTextToText.register(CromeConfig, CromeForConditionalGeneration)
AutoProcessor.register(CromeConfig, CromeProcessor)

__version__ = "0.2.0"

__all__ = [
    "BackboneChangedError",
    "BackboneInUseError",
    "BackboneMismatchError",
    "BackboneWeightsMissingError",
    "CromeAdapterConfig",
    "CromeConfig",
    "CromeForConditionalGeneration",
    "CromeProcessor",
    "ImageTokenMismatchError",
    "InvalidImageError",
    "InvalidTextError",
    "LavinConfig",
    "LavinForConditionalGeneration",
    "LavinProcessor",
    "MMAdapterConfig",
    "MissingWeightsError",
    "PeftOnTopError",
    "PromptTooLongError",
    "add_lora",
    "adopt_peft_model",
    "embedded_backbones",
]
