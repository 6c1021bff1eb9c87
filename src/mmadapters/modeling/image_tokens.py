"""Image placeholder tokens in `input_ids`, shared by LaVIN and CROME.

The placeholder is added to the tokenizer only (see `backbones.add_image_token`): its id may lie past the
frozen embedding matrix, so it is masked before the lookup and its positions are overwritten with visual tokens.
"""

import torch
from torch import nn
from torch.compiler import is_compiling

from ..errors import MMAdaptersError
from .peft_on_top import name_through_peft_layers


class ImageTokenMismatchError(MMAdaptersError, ValueError):
    """The image placeholder tokens in `input_ids` do not match the images given."""


class NumImageTokensError(MMAdaptersError, TypeError):
    """`num_image_tokens` given to a loader differs from the model's: it follows from the model's config and
    cannot be set. A TypeError, like an unknown keyword (and so that AutoProcessor, which takes a ValueError from
    the config for "no processor here", passes it on)."""


def check_num_image_tokens(asked: int | None, recorded: int, where: str) -> None:
    """Refuse a `num_image_tokens` keyword other than the model's (`where`: "the model of 'path'", ...)."""
    if asked is not None and asked != recorded:
        raise NumImageTokensError(
            f"num_image_tokens={asked}, but {where} makes {recorded} visual tokens per image, which its processor "
            "expands each <image> to. Leave num_image_tokens out."
        )


def vocabulary_size(embeddings: nn.Module) -> int:
    """Rows of the LLM's input embeddings, also under a PEFT layer or wrapper (LoRA, trainable tokens), which
    holds the nn.Embedding as its base layer. (Read from the module, not its weight: under FSDP the weight is a
    view of a flat parameter.)"""
    for part in name_through_peft_layers(embeddings, "weight").split(".")[:-1]:
        embeddings = getattr(embeddings, part)
    return embeddings.num_embeddings


def embed_text_tokens(
    embeddings: nn.Embedding, input_ids: torch.LongTensor, image_token_id: int
) -> torch.Tensor:
    """Token embeddings, with a dummy id at the image placeholders; other ids must be in the vocabulary."""
    vocab_size = vocabulary_size(embeddings)
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


def labels_without_image_tokens(
    labels: torch.LongTensor, image_token_id: int, vocab_size: int, ignore_index: int = -100
) -> torch.LongTensor:
    """`labels` with the image placeholders ignored: a placeholder is no token the LLM can predict (its position
    holds a visual token), so `labels=input_ids` trains on the text alone, as LLaVA's training code ignores image
    positions. Any other id outside the vocabulary is refused here rather than as an index error inside the loss."""
    image_mask = labels == image_token_id
    bad = (~image_mask) & (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if not is_compiling() and bad.any():  # see embed_text_tokens
        raise ValueError(
            f"labels contain ids outside the LLM vocabulary (0..{vocab_size - 1}) that are neither the image token "
            f"({image_token_id}) nor ignore_index ({ignore_index}): {labels[bad][:5].tolist()}. Build labels from "
            "this model's tokenizer, with ignore_index where nothing is to be predicted."
        )
    return labels.masked_fill(image_mask, ignore_index)


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
