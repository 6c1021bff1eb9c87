"""Image placeholder tokens in `input_ids`, shared by LaVIN and CROME.

The placeholder is added to the tokenizer only (see `backbones.add_image_token`): its id may lie past the
frozen embedding matrix, so it is masked before the lookup and its positions are overwritten with visual tokens.
"""

import torch
from torch import nn
from torch.compiler import is_compiling

from ..errors import MMAdaptersError


class ImageTokenMismatchError(MMAdaptersError, ValueError):
    """The image placeholder tokens in `input_ids` do not match the images given."""


def embed_text_tokens(
    embeddings: nn.Embedding, input_ids: torch.LongTensor, image_token_id: int
) -> torch.Tensor:
    """Token embeddings, with a dummy id at the image placeholders; other ids must be in the vocabulary."""
    vocab_size = embeddings.num_embeddings
    image_mask = input_ids == image_token_id
    bad = (~image_mask) & ((input_ids < 0) | (input_ids >= vocab_size))
    # Checks on values are skipped while torch.compile traces (a data-dependent branch is a graph break): run the
    # model eagerly once to have the inputs checked.
    if not is_compiling() and bad.any():
        raise ValueError(
            f"input_ids contain ids outside the LLM vocabulary (0..{vocab_size - 1}) that are not the image "
            f"token ({image_token_id}): {input_ids[bad][:5].tolist()}. Was the text tokenized with another "
            "tokenizer than this model's processor?"
        )
    return embeddings(input_ids.masked_fill(image_mask, 0))


def check_image_token_count(
    image_mask: torch.Tensor, num_images: int, per_image: int, processor_name: str
) -> None:
    if is_compiling():
        return  # see embed_text_tokens
    found = int(image_mask.sum().item())
    if found != num_images * per_image:
        raise ImageTokenMismatchError(
            f"input_ids hold {found} image placeholder tokens but {num_images} image(s) x {per_image} visual tokens = "
            f"{num_images * per_image} are needed. Build the inputs with {processor_name} (one image per `<image>` "
            "placeholder) and do not truncate inside an image."
        )


def refuse_images_without_pixels(image_mask: torch.Tensor) -> None:
    if not is_compiling() and image_mask.any():
        raise ImageTokenMismatchError(
            f"input_ids hold {int(image_mask.sum().item())} image placeholder tokens but no pixel_values were given. "
            "Pass the images through the processor."
        )
