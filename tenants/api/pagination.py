"""List responses: `{"object": "list", "data": [...], "total", "limit", "offset", "next"}`."""

from typing import Any

from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response


class ListPagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 500

    def get_paginated_response(self, data: list[Any]) -> Response:
        return Response(
            {
                "object": "list",
                "data": data,
                "total": self.count,
                "limit": self.limit,
                "offset": self.offset,
                "next": self.get_next_link(),
                "previous": self.get_previous_link(),
            }
        )

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        link = {"type": "string", "nullable": True, "format": "uri"}
        return {
            "type": "object",
            "required": ["object", "data", "total", "limit", "offset", "next", "previous"],
            "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": schema,
                "total": {"type": "integer", "example": 123},
                "limit": {"type": "integer", "example": 50},
                "offset": {"type": "integer", "example": 0},
                "next": link,
                "previous": link,
            },
        }
