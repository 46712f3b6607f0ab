"""Request checking: every bad input becomes a ServeError with a 4xx status and one sentence.

The routes parse bodies themselves (not through pydantic) so that each refusal names the offending
value and what to send instead, and so that a decompression bomb is refused from the image header,
before any pixel is decoded.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import warnings

JSON = "application/json"
MULTIPART = "multipart/form-data"


class ServeError(Exception):
    """A request the service refuses: HTTP status, a kind (for metrics) and a sentence for people."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def require_type(content_type: str | None, allowed: tuple[str, ...]) -> str:
    kind = media_type(content_type)
    if kind not in allowed:
        raise ServeError(415, "content_type", f"content type '{kind or 'none'}' is not accepted here: send "
                         f"{' or '.join(allowed)}")
    return kind


def parse_json(body: bytes) -> dict:
    """A JSON object from a request body, or 400 naming where the JSON breaks."""
    try:
        value = json.loads(body)
    except UnicodeDecodeError:
        raise ServeError(400, "malformed_json",
                         "the request body is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as e:
        raise ServeError(400, "malformed_json", f"the request body is not valid JSON ({e.msg} at line "
                         f"{e.lineno} column {e.colno}); send a JSON object") from None
    if not isinstance(value, dict):
        raise ServeError(400, "malformed_json", f"the request body is a JSON {type(value).__name__}, not an "
                         "object; send {\"tenant\": ..., ...}")
    return value


def field(body: dict, name: str, kind: type | tuple, default=None, required: bool = False):
    """body[name] checked against `kind`; a missing optional field gives `default`."""
    if name not in body or body[name] is None:
        if required:
            raise ServeError(422, "missing_field", f"field '{name}' is missing from the request")
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number
        value = None
    if value is None or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("str", "string").replace("int", "integer") for k in kinds)
        raise ServeError(422, "bad_field",
                         f"field '{name}' must be a {names}, got {json.dumps(body[name])[:60]}")
    return value


def check_k(k, limits) -> int:
    if k is None:
        return limits.default_k
    if isinstance(k, str):
        k = k.strip()
        if not k.lstrip("-").isdigit():
            raise ServeError(422, "bad_k",
                             f"k={k[:20]!r} is not a whole number: ask for 1 to {limits.max_k} results")
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ServeError(422, "bad_k", f"k={k!r} is not a whole number: ask for 1 to {limits.max_k} results")
    if not 1 <= k <= limits.max_k:
        raise ServeError(422, "bad_k", f"k={k} is out of range: ask for 1 to {limits.max_k} results")
    return k


def check_text(text, limits, name: str = "text") -> str:
    if not isinstance(text, str):
        raise ServeError(422, "bad_field", f"field '{name}' must be a string")
    stripped = text.strip()
    if not stripped:
        raise ServeError(422, "empty_query",
                         f"query {name} is empty: send 1 to {limits.max_query_chars} characters")
    if len(stripped) > limits.max_query_chars:
        raise ServeError(422, "long_query", f"query {name} has {len(stripped)} characters, over the limit of "
                         f"{limits.max_query_chars}: shorten it")
    return stripped


def check_target(target) -> str:
    target = "image" if target is None else target
    if target not in ("image", "text"):
        raise ServeError(422, "bad_target", f"target={str(target)[:30]!r} is not 'image' (similar images) or "
                         "'text' (matching captions)")
    return target


def decode_base64(data: str) -> bytes:
    """Standard or URL-safe base64, with or without padding or a 'data:...;base64,' prefix."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    data = "".join(data.split())
    try:
        return base64.urlsafe_b64decode(data.replace("+", "-").replace("/", "_") + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise ServeError(422, "bad_base64", "field 'image_b64' is not base64; send the image file's bytes "
                         "base64-encoded (URL-safe or standard)") from None


def open_image(data: bytes, limits):
    """An RGB PIL image from upload bytes; 422 for bytes that are not an image, 413 for a bomb."""
    from PIL import Image

    if not data:
        raise ServeError(422, "not_an_image", "the uploaded image is empty; send a JPEG, PNG or WebP file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # the header only
    except Image.DecompressionBombError:
        image = None
    except Exception:  # noqa: BLE001 (PIL raises many kinds for garbage)
        raise ServeError(422, "not_an_image", f"the uploaded {len(data)} bytes are not an image Pillow can "
                         "read; send a JPEG, PNG or WebP file") from None
    pixels = image.size[0] * image.size[1] if image is not None else limits.max_image_pixels + 1
    if pixels > limits.max_image_pixels:
        size = f"{image.size[0]} x {image.size[1]} pixels" if image is not None else "a huge image"
        raise ServeError(413, "image_too_large", f"the uploaded image is {size}, over the limit of "
                         f"{limits.max_image_pixels:,} pixels (a decompression bomb?); send a smaller image")
    try:
        image.draft("RGB", (1024, 1024))  # JPEGs decode at reduced scale when far larger than needed
        return image.convert("RGB")
    except Exception:  # noqa: BLE001
        raise ServeError(422, "not_an_image", "the uploaded image is truncated or corrupt; send a complete "
                         "JPEG, PNG or WebP file") from None
