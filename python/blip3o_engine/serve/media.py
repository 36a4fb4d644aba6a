"""Images that requests carry or point to, turned into PIL images under the server's limits.

Where an image may come from (`image_url.url` of a chat message; the upload of /v1/images/edits):
- `data:image/...;base64,...` URIs: always;
- `http(s)://` URLs: only from hosts in --allowed-media-domains (exact names), fetched without following
  redirects (a redirect could leave the allow-list), within --media-timeout-s for the whole fetch;
- `file://` URLs: only for files inside --allowed-local-media-path (after resolving links and `..`).
Every image is at most --max-media-mb bytes and --max-image-pixels pixels; the pixel count is read from the
image header and checked before anything is decoded (a small PNG can claim a huge canvas). Anything else is a
400 that says why.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, UnidentifiedImageError

from .errors import APIError, bad_request
from .settings import ServeSettings


class MediaLoader:
    """Loads images under one server's limits (module docstring)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.allowed_domains = frozenset(settings.allowed_media_domains)
        self.local_root = settings.allowed_local_media_path
        self.timeout_s = settings.media_timeout_s
        self.max_bytes = settings.max_media_bytes
        self.max_pixels = settings.max_image_pixels
        self._client = None  # httpx.AsyncClient, made on the first http(s) fetch

    async def load_url(self, url: str, param: str) -> Image.Image:
        """An `image_url` (data:, http(s):, file:) -> RGB PIL image; `param` names the field in errors."""
        if not isinstance(url, str) or not url:
            raise bad_request("an image URL must be a non-empty string", param=param)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = self._decode_data_uri(url, param)
        elif scheme in ("http", "https"):
            data = await self._fetch(url, param)
        elif scheme == "file":
            data = await self._read_local(url, param)
        else:
            raise bad_request(f"unsupported image URL {_short(url)}: use a data: URI, an http(s) URL from an allowed "
                              f"domain, or a file:// URL under the allowed local path", param=param)
        return self.decode(data, param)

    def decode(self, data: bytes, param: str) -> Image.Image:
        """Image file bytes -> RGB PIL image, refusing too many bytes or pixels before decoding."""
        if len(data) > self.max_bytes:
            raise self._too_big(len(data), param)
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
            if img.width * img.height > self.max_pixels:
                raise bad_request(f"the image is {img.width}x{img.height} = {img.width * img.height} pixels, more "
                                  f"than the server's limit of {self.max_pixels} (--max-image-pixels)",
                                  param=param, code="image_too_large")
            img.load()
        except APIError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
                SyntaxError) as e:  # SyntaxError: what some PIL plugins raise for a corrupt header
            raise bad_request(f"cannot decode the image: {e}", param=param, code="invalid_image") from e
        if img.width < 1 or img.height < 1:
            raise bad_request("the image has zero size", param=param, code="invalid_image")
        return img.convert("RGB")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------------------ sources

    def _decode_data_uri(self, url: str, param: str) -> bytes:
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise bad_request("a data: image URI must be base64: data:image/<type>;base64,<data>", param=param)
        if len(payload) * 3 // 4 > self.max_bytes + 3:
            raise self._too_big(len(payload) * 3 // 4, param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"the data: URI is not valid base64: {e}", param=param, code="invalid_image") from e

    async def _fetch(self, url: str, param: str) -> bytes:
        import httpx

        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        if host not in self.allowed_domains:
            allowed = ", ".join(sorted(self.allowed_domains)) or "none"
            raise bad_request(f"image URLs from {host or '(no host)'!r} are not allowed (allowed domains: {allowed}; "
                              f"--allowed-media-domains)", param=param, code="domain_not_allowed")
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, timeout=self.timeout_s)
        try:
            return await asyncio.wait_for(self._download(url, param), self.timeout_s)
        except asyncio.TimeoutError as e:
            raise bad_request(f"fetching {_short(url)} took longer than {self.timeout_s:g} s", param=param,
                              code="image_fetch_failed") from e
        except httpx.HTTPError as e:
            raise bad_request(f"cannot fetch {_short(url)}: {type(e).__name__}: {e}", param=param,
                              code="image_fetch_failed") from e

    async def _download(self, url: str, param: str) -> bytes:
        async with self._client.stream("GET", url) as response:
            if response.status_code != 200:
                raise bad_request(f"fetching {_short(url)} answered HTTP {response.status_code} (redirects are not "
                                  f"followed)", param=param, code="image_fetch_failed")
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                raise self._too_big(int(length), param)
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._too_big(size, param)
                chunks.append(chunk)
            return b"".join(chunks)

    async def _read_local(self, url: str, param: str) -> bytes:
        if self.local_root is None:
            raise bad_request("file:// image URLs are not allowed on this server (--allowed-local-media-path)",
                              param=param, code="local_media_not_allowed")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise bad_request(f"file URLs must name a local path (file:///...), got {_short(url)}", param=param)
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(self.local_root) or not path.is_file():
            raise bad_request(f"{_short(url)} is not a file under the allowed local media path", param=param,
                              code="local_media_not_allowed")
        size = path.stat().st_size
        if size > self.max_bytes:
            raise self._too_big(size, param)
        return await asyncio.to_thread(path.read_bytes)

    def _too_big(self, size: int, param: str) -> APIError:
        return bad_request(f"the image is {size} bytes, more than the server's limit of {self.max_bytes} "
                           f"(--max-media-mb)", param=param, code="image_too_large")


def _short(url: str, limit: int = 80) -> str:
    """A URL for an error message (data: URIs can be megabytes)."""
    return url if len(url) <= limit else url[:limit] + "..."


__all__ = ["MediaLoader"]
