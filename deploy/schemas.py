"""The HTTP contract of ``zeroconv serve``: request and response bodies, limits, and the error shape.

``POST /v1/generate`` takes a :class:`GenerateRequest`. Every request carries a list of
``controls``; each control names a served ControlNet and gives either a ready condition map
(``image``) or a photo to annotate on the server (``source_image`` + ``annotator``). One control is
plain ControlNet; several compose their ControlNets (diffusers' MultiControlNet).

Every rejected request gets one JSON shape, naming the field at fault::

    {"error": "steps must be between 1 and 50, got 500", "field": "steps"}

with status 400 (malformed: not JSON, bad base64, not an image), 401 (auth), 413 (over a size
limit), 422 (a value out of range, an unknown model or annotator), 503 (an annotator this server
offers could not be loaded) or 504 (timed out).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.common.config import Section
from pipelines.common.images import decode_rgb

# Image sides must be multiples of the VAE's (and the ControlNet condition encoder's) downsampling.
SIZE_MULTIPLE = 8
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A request the server refuses; becomes ``{"error": message, "field": field}`` with ``status``."""

    def __init__(self, field: str | None, message: str, status: int = 422):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status

    def body(self) -> dict:
        return {"error": self.message, "field": self.field}

    def __reduce__(self):  # raised in a model replica, re-raised in the gateway: pickled with all its fields
        return type(self), (self.field, self.message, self.status)


class LimitsConfig(Section):
    """What a single request may ask for. Anything over a limit is refused with a 4xx, never served."""

    max_request_bytes: int = Field(default=32 * 2**20, ge=1024, description="Largest request body (bytes).")
    max_image_bytes: int = Field(default=8 * 2**20, ge=1, description="Largest decoded image in a request (bytes).")
    max_image_pixels: int = Field(
        default=2048 * 2048, ge=1, description="Largest image in a request (width x height)."
    )
    min_size: int = Field(default=64, ge=SIZE_MULTIPLE, description="Smallest output width/height (pixels).")
    max_size: int = Field(default=1024, ge=SIZE_MULTIPLE, description="Largest output width/height (pixels).")
    max_steps: int = Field(default=100, ge=1, description="Most denoising steps a request may ask for.")
    max_guidance_scale: float = Field(default=30.0, ge=0, description="Largest classifier-free guidance scale.")
    max_conditioning_scale: float = Field(default=5.0, ge=0, description="Largest per-control conditioning scale.")
    max_controls: int = Field(default=4, ge=1, description="Most controls (ControlNets composed) in one request.")
    max_prompt_chars: int = Field(default=2000, ge=1, description="Longest prompt or negative prompt (characters).")


# ---------------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a field name is an error, not silently ignored


class Control(_Body):
    model: str | None = Field(default=None, description="Served model name; default: the server's first model.")
    image: str | None = Field(default=None, description="Condition map (PNG/JPEG/WebP...), base64.")
    source_image: str | None = Field(default=None, description="Photo to annotate on the server, base64.")
    annotator: str | None = Field(
        default=None, description="Annotator for source_image; default: the one the model was trained with."
    )
    scale: float = Field(default=1.0, description="Conditioning scale of this ControlNet.")
    control_type: str | None = Field(
        default=None,
        description="Union ControlNets only: the condition's type (openpose, depth, hed, canny, normal, segment); "
        "default: source_image's annotator's type, or the model's only trained type.",
    )


class GenerateRequest(_Body):
    prompt: str
    negative_prompt: str | None = None
    controls: list[Control]
    steps: int | None = Field(default=None, description="Denoising steps; default: the model's (20).")
    guidance_scale: float | None = Field(default=None, description="CFG scale; default: the model's (9.0).")
    seed: int | None = Field(default=None, description="Random seed; default: a random one (returned).")
    width: int | None = Field(default=None, description="Output width; default: the first control image's.")
    height: int | None = Field(default=None, description="Output height; default: the first control image's.")
    guess_mode: bool = False
    response_format: Literal["json", "png"] | None = Field(
        default=None, description="'png' answers image/png; default: JSON, or PNG when Accept asks for image/png."
    )


class ModelVersion(BaseModel):
    name: str
    version: str


class GenerateResponse(BaseModel):
    image: str  # base64 PNG
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    models: list[ModelVersion]
    batch_size: int  # requests that shared this pipeline call (1: it ran alone)
    elapsed_ms: float


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None
    default: bool
    base_model: str
    annotator: dict | None
    inference: dict
    own_unet: bool
    control_types: list[str] | None = None  # a union ControlNet: the types it was trained on


def parse_request(body: bytes) -> GenerateRequest:
    """JSON body -> GenerateRequest; every problem becomes a RequestError naming the field."""
    try:
        return GenerateRequest.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            raise RequestError(None, f"request body is not valid JSON: {err['msg']}", 400) from None
        field = field_name(err["loc"])
        if err["type"] == "extra_forbidden":
            raise RequestError(field, f"{field} is not a known field") from None
        if err["type"] == "missing":
            raise RequestError(field, f"{field} is required") from None
        raise RequestError(field, f"{field}: {err['msg']}") from None


def field_name(loc: tuple) -> str:
    """("controls", 0, "image") -> "controls[0].image"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


# ---------------------------------------------------------------------------------------------
# Checks that depend on the configured limits
# ---------------------------------------------------------------------------------------------


def check_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise RequestError(field, f"{field} must be between {low} and {high}, got {value}")


def check_size(field: str, value: int, limits: LimitsConfig, origin: str = "") -> None:
    where = f" (from {origin})" if origin else ""
    if value % SIZE_MULTIPLE:
        raise RequestError(field, f"{field} must be a multiple of {SIZE_MULTIPLE}, got {value}{where}")
    if not limits.min_size <= value <= limits.max_size:
        raise RequestError(
            field, f"{field} must be between {limits.min_size} and {limits.max_size}, got {value}{where}"
        )


def decode_image(data: str, field: str, limits: LimitsConfig) -> np.ndarray:
    """A base64 image field -> uint8 (H, W, 3), refusing bad base64, non-images and oversized images."""
    if data.startswith("data:"):  # accept data URLs: data:image/png;base64,....
        data = data.partition(",")[2]
    data = "".join(data.split())  # `base64` wraps lines at 76 characters; newlines are not errors
    if len(data) * 3 // 4 > limits.max_image_bytes + 2:
        raise RequestError(field, f"{field} is larger than the {limits.max_image_bytes}-byte limit", 413)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, f"{field} is not valid base64", 400) from None
    if len(raw) > limits.max_image_bytes:
        raise RequestError(field, f"{field} is {len(raw)} bytes; the limit is {limits.max_image_bytes}", 413)
    try:
        # Opening reads only the header: check the pixel count before decoding anything.
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise RequestError(field, f"{field} has too many pixels (limit {limits.max_image_pixels})", 413) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(field, f"{field} is not an image (send PNG, JPEG or WebP, base64-encoded)", 400) from None
    if width * height > limits.max_image_pixels:
        raise RequestError(
            field,
            f"{field} is {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels}",
            413,
        )
    try:
        return decode_rgb(raw)
    except (OSError, ValueError, SyntaxError):
        raise RequestError(field, f"{field} is a corrupt or truncated image", 400) from None
