"""POST /v1/images/generations and /v1/images/edits over `AsyncEngine.generate_image_stream`.

`n` images are `n` engine requests; image i uses seed + i (as `Engine.generate_images`), so an image made with
a seed here equals `Engine.generate_image`'s with that seed. Sizes are "WxH" (OpenAI's order); the default is
the model's native size. Only `response_format: "b64_json"` exists: the server keeps no files to link to.

Streaming (`stream: true`) sends OpenAI's events: `image_generation.partial_image` (`image_edit.` for edits)
for up to `partial_images` previews, decoded from the decoder's current x0 prediction, then
`image_generation.completed` per image, then `data: [DONE]`. With `stream_progress: true` it also sends
`image_generation.progress` events ({stage, step, total}) at every stage step, for progress bars.
Edits are image-conditioned generation: the uploaded image conditions the prompt's prefill.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..async_engine import AsyncEngine
from ..outputs import ImageOutput, ImageResult
from ..params import ImageParams
from .errors import bad_request, from_exception, validation_error
from .media import MediaLoader
from .metrics import ServerMetrics, track_image
from .protocol import ImageRequest
from .streaming import EventStreamResponse, collect_last, merge, sse, start_all, until_disconnected

SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class ImageService:
    def __init__(self, engine: AsyncEngine, media: MediaLoader, metrics: ServerMetrics, model_name: str) -> None:
        self.engine = engine
        self.media = media
        self.metrics = metrics
        self.model_name = model_name

    async def generations(self, body: ImageRequest, request: Request):
        return await self._run(body, None, request, "image_generation")

    async def edits(self, request: Request, check_model) -> Any:
        """Multipart: `image` (or `image[]`, one file) and the generation fields as form fields."""
        form = await request.form()
        try:
            uploads = [v for k, v in form.multi_items() if k in ("image", "image[]")]
            if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
                raise bad_request(f"send exactly one image file in the 'image' field, got {len(uploads)}",
                                  param="image")
            if "mask" in form:
                raise bad_request("mask is not supported: BLIP3-o conditions on the whole image", param="mask")
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            try:
                body = ImageRequest.model_validate(fields)
            except ValidationError as e:
                raise validation_error(list(e.errors())) from None
            check_model(body.model)
            data = await uploads[0].read(self.media.max_bytes + 1)
        finally:
            await form.close()
        image = await asyncio.to_thread(self.media.decode, data, "image")
        return await self._run(body, image, request, "image_edit")

    # ------------------------------------------------------------------------------ the requests

    async def _run(self, body: ImageRequest, image: Image.Image | None, request: Request, event_prefix: str):
        arrival = time.perf_counter()
        if body.response_format not in (None, "b64_json"):
            raise bad_request(f"response_format {body.response_format!r} is not supported: this server keeps no "
                              f"image files to link to; use 'b64_json' (the default)", param="response_format")
        params = self._image_params(body)
        seeds = params.image_seeds(body.n)
        previews = body.partial_images if body.stream else 0
        preview_every = max(1, params.decoder_steps // (previews + 1)) if previews else 0
        rid = f"img-{uuid.uuid4().hex}"
        streams = [track_image(self.metrics, self.engine.generate_image_stream(
            body.prompt, dataclasses.replace(params, seed=seed), image, request_id=f"{rid}-{i}",
            preview_every=preview_every), arrival) for i, seed in enumerate(seeds)]
        if body.stream:
            streams = await until_disconnected(request, start_all(streams))
            return EventStreamResponse(self._events(body, streams, event_prefix))
        finals = await until_disconnected(request, collect_last(streams))
        data = [{"b64_json": await _encode(out.result.image, body), "revised_prompt": None, "seed": out.result.seed}
                for out in finals]
        return JSONResponse({"created": int(time.time()), "data": data, "background": "opaque",
                             "output_format": body.output_format, "quality": "auto",
                             "size": _size(finals[0].result.image)})

    def _image_params(self, body: ImageRequest) -> ImageParams:
        height = width = None
        if body.size not in (None, "", "auto"):
            match = SIZE.match(body.size)
            if match is None:
                raise bad_request(f"size must be 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto', got {body.size!r}",
                                  param="size")
            width, height = int(match.group(1)), int(match.group(2))
        fields = dict(height=height, width=width, seed=body.seed, decoder_steps=body.num_inference_steps,
                      decoder_guidance=body.guidance_scale, dit_steps=body.dit_steps,
                      dit_guidance=body.dit_guidance_scale)
        return ImageParams(**{k: v for k, v in fields.items() if v is not None})  # None: ImageParams' default

    async def _events(self, body: ImageRequest, streams: list[AsyncIterator[ImageOutput]],
                      prefix: str) -> AsyncIterator[str]:
        sent_previews = [0] * len(streams)
        try:
            async for i, out in merge(streams):
                if body.stream_progress:
                    yield sse({"type": f"{prefix}.progress", "index": i, "stage": out.stage, "step": out.step,
                               "total": out.total}, f"{prefix}.progress")
                if out.preview is not None and sent_previews[i] < body.partial_images and not out.finished:
                    event = self._event(body, prefix, "partial_image", i, out.preview,
                                        partial_image_index=sent_previews[i])
                    sent_previews[i] += 1
                    yield sse(await event, f"{prefix}.partial_image")
                if out.finished:
                    result: ImageResult = out.result
                    yield sse(await self._event(body, prefix, "completed", i, result.image, seed=result.seed),
                              f"{prefix}.completed")
        except Exception as e:  # noqa: BLE001 - after the 200 the only way to tell the client is an event
            yield sse(from_exception(e).body(), "error")
        yield sse("[DONE]")

    async def _event(self, body: ImageRequest, prefix: str, kind: str, index: int, image: Image.Image,
                     **extra: Any) -> dict[str, Any]:
        return {"type": f"{prefix}.{kind}", "b64_json": await _encode(image, body), "created_at": int(time.time()),
                "size": _size(image), "quality": "auto", "background": "opaque",
                "output_format": body.output_format, "index": index, **extra}


async def _encode(image: Image.Image, body: ImageRequest) -> str:
    """The image as base64 in the requested format (in a thread: a 1024² PNG takes tens of milliseconds)."""

    def encode() -> str:
        buf = io.BytesIO()
        options = {}
        if body.output_format in ("jpeg", "webp") and body.output_compression is not None:
            options["quality"] = body.output_compression
        image.save(buf, format=PIL_FORMATS[body.output_format], **options)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    return await asyncio.to_thread(encode)


def _size(image: Image.Image) -> str:
    return f"{image.width}x{image.height}"


__all__ = ["ImageService"]
