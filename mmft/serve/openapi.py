"""Request-body schemas and examples for the OpenAPI docs (/docs); the routes check bodies themselves."""
from __future__ import annotations


def _json_body(schema: dict, example: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema,
                                                                                 "example": example}}}}


_TENANT = {"type": "string", "description": "tenant name (GET /tenants); 'baseline' is the frozen base"}
_K = {"type": "integer", "minimum": 1, "description": "results wanted (default limits.default_k)"}
_THUMBS = {"type": "boolean", "default": False, "description": "add each result's thumbnail as a data: URL"}

TEXT_QUERY = _json_body(
    {"type": "object", "required": ["tenant", "text"],
     "properties": {"tenant": _TENANT, "text": {"type": "string", "minLength": 1}, "k": _K,
                    "thumbnails": _THUMBS}},
    {"tenant": "tuned", "text": "a red fox in the snow", "k": 5})

IMAGE_QUERY = {"requestBody": {"required": True, "content": {
    "application/json": {
        "schema": {"type": "object", "required": ["tenant", "image_b64"],
                   "properties": {"tenant": _TENANT, "image_b64": {
                       "type": "string", "description": "the image file, base64 (URL-safe or standard)"},
                       "k": _K, "target": {"type": "string", "enum": ["image", "text"], "default": "image"},
                       "thumbnails": _THUMBS}},
        "example": {"tenant": "tuned", "image_b64": "iVBORw0KGgoAAAANSUhEUgAA...", "k": 5,
                    "target": "image"}},
    "multipart/form-data": {
        "schema": {"type": "object", "required": ["tenant", "image"],
                   "properties": {"tenant": _TENANT, "image": {"type": "string", "format": "binary"},
                                  "k": _K, "target": {"type": "string", "enum": ["image", "text"]},
                                  "thumbnails": _THUMBS}}}}}}

FEEDBACK = _json_body(
    {"type": "object", "required": ["tenant", "query", "key", "relevant"],
     "properties": {"tenant": _TENANT, "query": {"type": "string"}, "key": {"type": "string",
                    "description": "the gallery image judged"}, "relevant": {"type": "boolean"},
                    "rank": {"type": "integer"},
                    "query_kind": {"type": "string", "enum": ["text", "image"]}}},
    {"tenant": "tuned", "query": "a red fox in the snow", "key": "000123", "relevant": True, "rank": 2})

RELOAD = {"requestBody": {"required": False, "content": {"application/json": {
    "schema": {"type": "object", "properties": {"tenants": {"type": "array", "items": {"type": "string"}}}},
    "example": {"tenants": ["tuned"]}}}}}

SEARCH_RESPONSE = {"200": {"description": "top-k results", "content": {"application/json": {"example": {
    "tenant": "tuned", "version": 3, "k": 2, "took_ms": 7.9, "results": [
        {"rank": 1, "key": "000123", "score": 0.4123, "caption": "red fox"},
        {"rank": 2, "key": "000077", "score": 0.3981, "caption": "fox cub"}]}}}}}
