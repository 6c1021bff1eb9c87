from .configuration_crome import STAGES, CromeConfig
from .modeling_crome import STAGE_MODULES, CromeForConditionalGeneration, CromePreTrainedModel

__all__ = ["STAGES", "STAGE_MODULES", "CromeConfig", "CromeForConditionalGeneration", "CromePreTrainedModel"]
