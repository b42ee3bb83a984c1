"""API errors: the API's usual ``{"errors": [{code, title, detail, source}]}`` shape.

``source.pointer`` (a JSON Pointer into the request body) names a body field;
``source.parameter`` names a query or path parameter. Every endpoint of the HTTP
application answers its errors through :class:`ApiError`, whatever its status: the
title is the status's reason phrase (``Gateway Timeout`` for a 504).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import ValidationError

from agent.config import shown_input

__all__ = ["ApiError", "Problem", "validation_problems"]

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def title_of(status: int) -> str:
    if status in TITLES:
        return TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Problem:
    """One entry of ``errors``."""

    def __init__(
        self, code: str, detail: str, *, pointer: str | None = None, parameter: str | None = None, title: str = ""
    ) -> None:
        self.code = code
        self.detail = detail
        self.pointer = pointer
        self.parameter = parameter
        self.title = title

    def to_json(self, status: int) -> dict[str, Any]:
        title = self.title or title_of(status)
        body: dict[str, Any] = {"code": self.code, "title": title, "detail": self.detail}
        if self.pointer is not None:
            body["source"] = {"pointer": self.pointer}
        elif self.parameter is not None:
            body["source"] = {"parameter": self.parameter}
        return body


class ApiError(Exception):
    """Answer ``status`` with ``problems`` (at least one)."""

    def __init__(self, status: int, *problems: Problem, headers: dict[str, str] | None = None) -> None:
        super().__init__("; ".join(p.detail for p in problems))
        self.status = status
        self.problems = list(problems)
        self.headers = headers or {}

    @classmethod
    def one(
        cls, status: int, code: str, detail: str, *, pointer: str | None = None, parameter: str | None = None
    ) -> ApiError:
        return cls(status, Problem(code, detail, pointer=pointer, parameter=parameter))

    def to_json(self) -> dict[str, Any]:
        return {"errors": [p.to_json(self.status) for p in self.problems]}


def _pointer(prefix: str, loc: tuple[int | str, ...]) -> str:
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in loc]
    return prefix + "".join("/" + p for p in parts)


def validation_problems(err: ValidationError, prefix: str = "") -> list[Problem]:
    """One problem per pydantic error, each pointing at the field it is about."""
    out: list[Problem] = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        kind = e["type"]
        if kind == "extra_forbidden":
            code, msg = "unknown_field", "unknown field (check the spelling against the API reference)"
        elif kind == "missing":
            code, msg = "missing_field", "this field is required"
        elif kind.endswith(("_type", "_parsing")):
            code = "invalid_type"
        else:
            code = "invalid_value"
        if "password (or password_file) is required" in msg:
            loc, msg, code = (*loc, "password"), "password is required", "missing_field"
        if code != "missing_field":
            msg += shown_input(loc, e.get("input"))
        out.append(Problem(code, msg, pointer=_pointer(prefix, loc)))
    return out
