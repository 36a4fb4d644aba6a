"""Request bodies in OpenAI's shapes (pydantic). Unknown fields are ignored, as vLLM does, so that clients
sending newer or vendor fields (`logprobs`, `user`, `quality`, ...) still work; the fields below are read.
Values the engine checks itself (`max_tokens >= 1`, `top_p` in (0, 1], image sizes, step counts) are left to
`SamplingParams` / `ImageParams` / the engine, whose `InputError` becomes a 400 naming the field.

Responses are plain dicts built where they are produced (chat.py, images.py): their shapes are OpenAI's
`chat.completion`, `chat.completion.chunk`, images response and image stream events.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------ chat


class ImageURL(_Request):
    url: str
    detail: str | None = None  # accepted, not used: the image processor picks the resolution


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURLPart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImageURLPart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    temperature: float | None = None  # None: 1.0, OpenAI's and vLLM's default
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    repetition_penalty: float | None = None  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=128)
    ignore_eos: bool = False  # vLLM's extension
    stream: bool = False
    stream_options: StreamOptions | None = None


# ------------------------------------------------------------------------------ images

OutputFormat = Literal["png", "jpeg", "webp"]


class ImageRequest(_Request):
    """The fields /v1/images/generations and /v1/images/edits share (edits arrive as multipart form fields,
    which pydantic converts from strings)."""

    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: str | None = None  # "WxH"; None or "auto": the model's native size
    response_format: str | None = None  # only "b64_json" (the default): the server keeps no files to link to
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)  # jpeg/webp quality
    stream: bool = False
    partial_images: int = Field(default=0, ge=0, le=3)
    # Extensions (diffusers' names for the decoder, BLIP3-o's for its DiT stage):
    seed: int | None = None
    num_inference_steps: int | None = None  # decoder (UNet) steps
    guidance_scale: float | None = None  # decoder CFG scale
    dit_steps: int | None = None
    dit_guidance_scale: float | None = None
    # With stream: also send `image_generation.progress` events (stage, step, total), e.g. for a progress bar.
    stream_progress: bool = False


__all__ = ["ChatCompletionRequest", "ChatMessage", "ImageRequest", "ImageURL", "ImageURLPart", "StreamOptions",
           "TextPart"]
