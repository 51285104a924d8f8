"""The processor files of an exported llava-hf directory, so that
``AutoProcessor.from_pretrained(out)`` + ``processor.apply_chat_template(...)`` give exactly
the prompt ids and pixels our evaluation and chat use.

- ``preprocessor_config.json``: transformers' LlavaImageProcessor with our preprocessing
  (pad-to-square with the mean colour when the run pads, shortest side to the image size,
  bicubic, center crop, our mean/std), which gives the pixels of `data.image.ImagePreprocessor`.
- ``processor_config.json`` + the tokenizer (with our special tokens): a LlavaProcessor whose
  image token is ``<im_patch>``, expanded to the model's image-token count.
- the chat template: `data.conversation.chat_template_jinja` for the run's template and
  image placement, with one ``<im_patch>`` (inside ``<im_start>``/``<im_end>`` when the
  run uses them) standing for the image.
"""

from __future__ import annotations

from exgra_jax.convert.hf import hf_config
from exgra_jax.data.conversation import chat_template_jinja, get_template
from exgra_jax.data.image import ImageConfig
from exgra_jax.data.tokenizer import IM_END_TOKEN, IM_START_TOKEN, IMAGE_PATCH_TOKEN
from exgra_jax.models.config import ModelConfig


def image_processor(image: ImageConfig):
    from transformers import LlavaImageProcessor  # noqa: PLC0415

    size = image.image_size
    return LlavaImageProcessor(
        do_pad=image.aspect == "pad", size={"shortest_edge": size},
        crop_size={"height": size, "width": size}, do_center_crop=True, resample=3,
        image_mean=list(image.mean), image_std=list(image.std), do_convert_rgb=True)


def save_processor(out_dir: str, config: ModelConfig, tokenizer, *, template: str,
                   image_first: bool, use_im_start_end: bool, image: ImageConfig) -> None:
    """Writes the tokenizer, the image processor, the processor and its chat template."""
    from transformers import LlavaProcessor  # noqa: PLC0415

    get_template(template)  # an unknown name fails before anything is written
    if image.image_size != config.image_size:
        raise ValueError(f"image size {image.image_size} != the model's {config.image_size}")
    block = IMAGE_PATCH_TOKEN
    if use_im_start_end:
        block = IM_START_TOKEN + block + IM_END_TOKEN
    processor = LlavaProcessor(
        image_processor=image_processor(image), tokenizer=tokenizer,
        chat_template=chat_template_jinja(template, block, image_first),
        patch_size=config.patch_size, image_token=IMAGE_PATCH_TOKEN,
        # LlavaProcessor counts patches + this, minus one for the 'default' strategy.
        vision_feature_select_strategy=hf_config(config)["vision_feature_select_strategy"],
        num_additional_image_tokens=1 if config.vision_has_cls else 0)
    processor.save_pretrained(out_dir)
    # transformers >= 5 nests the image processor in processor_config.json; older readers
    # (and serving engines) look for preprocessor_config.json.
    processor.image_processor.save_pretrained(out_dir)
