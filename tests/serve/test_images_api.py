"""/v1/images/generations and /v1/images/edits through a real server subprocess and the real `openai` client.

An image made with a seed equals `Engine.generate_image`'s with that seed, up to one uint8 level: the server
batches the n images of a request in its decoder and runs one torch thread, the in-process engine runs them
alone on two, and fp32 GEMMs then round differently by ~1e-6 (see tests/parity/test_paged_t2i.py)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from blip3o_engine import ImageParams
from _serve_util import png_bytes

FAST = {"num_inference_steps": 4, "dit_steps": 3}
FAST_PARAMS = dict(decoder_steps=4, dit_steps=3)


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def assert_same_image(got: Image.Image, want: Image.Image) -> None:
    a, b = np.asarray(got.convert("RGB"), dtype=np.int16), np.asarray(want, dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # module docstring: GEMM rounding only


def test_seeded_images_equal_the_engines(client, oracle):
    want = [oracle.generate_image("a red apple", ImageParams(seed=s, **FAST_PARAMS)).image for s in (11, 12)]
    got = client.images.generate(model="tiny", prompt="a red apple", n=2, extra_body={"seed": 11, **FAST})
    assert len(got.data) == 2 and got.size == "64x64" and got.output_format == "png"
    for item, image, seed in zip(got.data, want, (11, 12)):  # image i uses seed + i
        img = decode(item.b64_json)
        assert img.format == "PNG"
        assert_same_image(img, image)
        assert item.model_extra["seed"] == seed


def test_formats_sizes_and_guidance(client, oracle):
    want = oracle.generate_image("a cat", ImageParams(seed=3, height=64, width=32, decoder_guidance=2.0,
                                                      dit_guidance=1.5, **FAST_PARAMS)).image
    got = client.images.generate(model="tiny", prompt="a cat", size="32x64", output_format="webp",
                                 extra_body={"seed": 3, "guidance_scale": 2.0, "dit_guidance_scale": 1.5, **FAST})
    img = decode(got.data[0].b64_json)
    assert img.format == "WEBP" and img.size == (32, 64) and got.size == "32x64"  # "WxH"
    jpeg = client.images.generate(model="tiny", prompt="a cat", output_format="jpeg", output_compression=80,
                                  extra_body={"seed": 3, **FAST})
    assert decode(jpeg.data[0].b64_json).format == "JPEG"
    lossless = client.images.generate(model="tiny", prompt="a cat", size="32x64", output_format="webp",
                                      output_compression=100,
                                      extra_body={"seed": 3, "guidance_scale": 2.0, "dit_guidance_scale": 1.5, **FAST})
    assert decode(lossless.data[0].b64_json).size == want.size


def test_bad_image_requests_are_400(http):
    cases = [({"prompt": "x", "response_format": "url"}, "b64_json"), ({"prompt": "x", "n": 11}, "n"),
             ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "size": "big"}, "size"),
             ({"prompt": "x", "size": "64x65"}, "multiples"), ({"prompt": "x", "size": "9000x64"}, "width"),
             ({"prompt": "x", "output_format": "gif"}, "output_format"), ({"prompt": "x", "partial_images": 4},
                                                                          "partial_images"),
             ({"prompt": "x", "guidance_scale": -1}, "guidance"), ({"prompt": "x", "num_inference_steps": 0}, "steps"),
             ({"prompt": "x", "seed": -5}, "seed"), ({}, "prompt")]
    for body, word in cases:
        r = http.post("/v1/images/generations", json={"model": "tiny", **body})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert word in err["message"] + str(err["param"]), (body, err)
    r = http.post("/v1/images/generations", json={"model": "dall-e-3", "prompt": "x"})
    assert r.status_code == 404


def test_streamed_generation_sends_partials_then_the_image(client, http):
    events = list(client.images.generate(model="tiny", prompt="a red apple", stream=True, partial_images=2,
                                         extra_body={"seed": 21, "num_inference_steps": 6, "dit_steps": 3}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = decode(events[-1].b64_json)
    plain = client.images.generate(model="tiny", prompt="a red apple",
                                   extra_body={"seed": 21, "num_inference_steps": 6, "dit_steps": 3})
    assert_same_image(final, decode(plain.data[0].b64_json))  # asking for previews changes nothing
    for e in events[:2]:
        preview = decode(e.b64_json)
        assert preview.size == final.size and np.asarray(preview).std() > 0  # a decoded x0 estimate, not blank

    # The raw stream: named events, progress on request, [DONE] at the end.
    body = {"model": "tiny", "prompt": "a red apple", "stream": True, "stream_progress": True, "seed": 21, **FAST}
    with http.stream("POST", "/v1/images/generations", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    data = [json.loads(line[6:]) for line in lines[:-1] if line.startswith("data: ")]
    stages = [(d["stage"], d["step"]) for d in data if d["type"] == "image_generation.progress"]
    assert stages[0] == ("prefill", 1) and ("decoder", 4) in stages and stages[-1][0] == "vae"
    assert data[-1]["type"] == "image_generation.completed"
    assert [line for line in lines if line.startswith("event: ")][-1] == "event: image_generation.completed"


def test_edits_condition_on_the_uploaded_image(client, oracle, test_image, http):
    want = oracle.generate_image("make it blue", ImageParams(seed=5, **FAST_PARAMS), image=test_image).image
    got = client.images.edit(model="tiny", image=("apple.png", png_bytes(test_image), "image/png"),
                             prompt="make it blue", extra_body={"seed": 5, **FAST})
    assert_same_image(decode(got.data[0].b64_json), want)
    unconditioned = oracle.generate_image("make it blue", ImageParams(seed=5, **FAST_PARAMS)).image
    assert np.abs(np.asarray(want, dtype=np.int16) - np.asarray(unconditioned, dtype=np.int16)).max() > 1

    events = list(client.images.edit(model="tiny", image=("apple.png", png_bytes(test_image), "image/png"),
                                     prompt="make it blue", stream=True, partial_images=1,
                                     extra_body={"seed": 5, **FAST}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert_same_image(decode(events[-1].b64_json), want)

    files = {"image": ("a.png", b"not an image", "image/png")}
    r = http.post("/v1/images/edits", files=files, data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
    r = http.post("/v1/images/edits", data={"prompt": "x"}, files={"other": ("a.txt", b"x")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    png = ("a.png", png_bytes(test_image), "image/png")
    r = http.post("/v1/images/edits", files={"image": png, "mask": png}, data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    r = http.post("/v1/images/edits", files={"image": png}, data={"prompt": "x", "n": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


@pytest.mark.parametrize("stream", [False, True])
def test_n_images_stream_or_not(client, stream, oracle):
    kwargs = dict(model="tiny", prompt="a dog", n=2, extra_body={"seed": 40, **FAST})
    if stream:
        events = [e for e in client.images.generate(stream=True, **kwargs)]
        finals = {e.model_extra["index"]: decode(e.b64_json) for e in events if e.type.endswith("completed")}
        images = [finals[0], finals[1]]
    else:
        images = [decode(d.b64_json) for d in client.images.generate(**kwargs).data]
    for image, seed in zip(images, (40, 41)):
        assert_same_image(image, oracle.generate_image("a dog", ImageParams(seed=seed, **FAST_PARAMS)).image)
