"""The HTTP API's request and response models: what ``/openapi.json`` is generated from.

Rules
-----
* Request bodies are described by models derived from the ones that validate them
  (the config file's ``ExternalUacSettings``, ``InternalUacSettings``,
  ``RegistrationKnobs`` and the API's ``ApiFields``): a field added there appears here
  with its constraints. The body itself is validated by the service with those same
  models (strict JSON, every error pointing at its field, merge-patch on PATCH); these
  derived models only describe it, so no rule is written twice.
* Query parameters are models that FastAPI validates (``QueryModel``): each says which
  status a wrong parameter gets (400 for seed 002's status endpoint and the probes, 422
  for seed 004's connections API) and which code an unknown one gets.
* Response models are exact (``additionalProperties: false``): the property-based run
  (schemathesis) checks every answer against them, so the document cannot drift from
  what is served.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema, WithJsonSchema

from agent.api.models import ApiFields
from agent.config import ExternalUacSettings, InternalUacSettings, RegistrationKnobs

__all__ = [
    "MAX_QUERY_FIELDS",
    "AdminQuery",
    "AdminStatus",
    "ConnectionCreate",
    "ConnectionEnvelope",
    "ConnectionList",
    "ConnectionUpdate",
    "ConnectionView",
    "Errors",
    "Health",
    "ListQuery",
    "NoQuery",
    "QueryModel",
    "Readiness",
    "ReadyQuery",
    "RegistrationStatusView",
    "ReloadReport",
    "StatusQuery",
]

MAX_QUERY_FIELDS = 20
"""A query string with more fields than this cannot be read: 400 on every path."""

DESCRIPTIONS = {
    "connection_name": "A name for people. Required on create, 1-255 characters.",
    "user_name": "The connection's own SIP user name (4-64 of letters, digits, '.', '_', '~', '-'); generated when "
    "omitted; unique per agent. Not used to register to the PBX (that is external_uac_settings.username).",
    "password": "The connection's own password (8-128 printable characters); generated when omitted and then "
    "returned once, in the create response. Never returned otherwise.",
    "user_id": "Owner. Only the operator key (http.api_key) may name one; default: the key's user, or "
    "http.default_user_id for the operator key.",
    "active": "false: keep the connection but do not register (unregisters a running registration).",
    "proxy": "The PBX registrar as a SIP URI (sip:host[:port]); 'sip:' may be omitted. No user part.",
    "outbound_proxy": "Optional SIP URI every REGISTER is sent through (loose route).",
    "transport": "UDP, TCP or TLS (case-insensitive). TLS needs sip.tls_ca_file in the agent's config.",
    "username": "User part of the address of record registered (To/From of REGISTER).",
    "auth_username": "Digest user name; default: username.",
    "from_user": "User part of From on calls the agent places; default: username.",
    "expiration_sec": "Expiry requested in REGISTER, 10-86400 s. The registrar's answer wins.",
    "destination_uri": "Where the PBX's calls for this connection go: <extension>@<application FQDN>, 'sip:' "
    "optional. Changing it never re-registers.",
}

_EXAMPLE_EXT = {
    "proxy": "sip:pbx.example.com:5060",
    "username": "telnyx-reg",
    "password": "s3cret",
    "transport": "TCP",
}


# -- deriving request models from the validating ones ----------------------------------


def _without_none(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if not args or len(args) == len(get_args(annotation)):
        return annotation
    return args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007 - built at run time


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _optional(annotation: Any, description: str | None = None) -> tuple[Any, FieldInfo]:
    """A field that may be left out but is never null."""
    return (
        _without_none(annotation) | cast(Any, SkipJsonSchema)[None],
        FieldInfo(default=None, description=description, json_schema_extra=_drop_default),
    )


def _derive(
    source: type[BaseModel],
    name: str,
    doc: str,
    *,
    drop: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    not_null: tuple[str, ...] = (),
    nullable: bool = False,
    extra: dict[str, Any] | None = None,
    examples: list[dict[str, Any]] | None = None,
) -> type[BaseModel]:
    """A model with ``source``'s fields and constraints (minus ``drop``), as the API takes
    them: ``required`` ones required, ``not_null`` ones optional but never null, the others
    as ``source`` has them (or all null-able, as in a merge patch, when ``nullable``)."""
    fields: dict[str, Any] = {}
    for field_name, info in source.model_fields.items():
        if field_name in drop:
            continue
        annotation: Any = info.annotation
        if info.metadata:
            annotation = cast(Any, Annotated)[(annotation, *info.metadata)]
        description = info.description or DESCRIPTIONS.get(field_name)
        if field_name in required:
            fields[field_name] = (_without_none(annotation), FieldInfo(description=description))
        elif field_name in not_null:
            fields[field_name] = _optional(annotation, description)
        elif nullable:
            fields[field_name] = (annotation | None, FieldInfo(default=None, description=description))
        else:
            fields[field_name] = (annotation, FieldInfo(default=info.get_default(), description=description))
    fields.update(extra or {})
    config = ConfigDict(extra="forbid", json_schema_extra=cast(JsonDict, {"examples": examples}) if examples else None)
    model: type[BaseModel] = create_model(name, __config__=config, __doc__=doc, **fields)
    return model


_ExternalCreate = _derive(
    ExternalUacSettings,
    "ExternalUacSettingsCreate",
    "How the agent registers to the PBX (seed 000). The password is sent, never a file to read it from.",
    drop=("password_file",),
    required=("proxy", "username", "password"),
    extra={
        "password": (
            Annotated[str, Field(json_schema_extra={"format": "password", "writeOnly": True})],
            FieldInfo(description="The SIP password for the registration. Never returned."),
        )
    },
)
_ExternalPatch = _derive(
    ExternalUacSettings,
    "ExternalUacSettingsPatch",
    "Merged into the current settings (RFC 7396): fields sent change, null removes one.",
    drop=("password_file",),
    nullable=True,
)
_ExternalView = _derive(
    ExternalUacSettings,
    "ExternalUacSettingsView",
    "As sent, without the password.",
    drop=("password", "password_file"),
    required=tuple(ExternalUacSettings.model_fields),
    extra={
        "outbound_proxy": (str | None, FieldInfo(description=DESCRIPTIONS["outbound_proxy"])),
        "auth_username": (str | None, FieldInfo(description=DESCRIPTIONS["auth_username"])),
        "from_user": (str | None, FieldInfo(description=DESCRIPTIONS["from_user"])),
    },
)
_InternalView = _derive(
    InternalUacSettings,
    "InternalUacSettingsView",
    "Where and how the PBX's calls go (seed 000).",
    required=tuple(InternalUacSettings.model_fields),
    extra={
        "destination_uri": (str | None, FieldInfo(description=DESCRIPTIONS["destination_uri"])),
        "allowed_sources": (list[str], FieldInfo(description="CIDRs allowed to place calls besides the proxies.")),
        "max_calls": (int | None, FieldInfo(description="Concurrent forwarded calls for this connection.")),
    },
)

ConnectionCreate = _derive(
    ApiFields,
    "ConnectionCreate",
    "A new connection. Only connection_name is required.",
    required=("connection_name",),
    extra={
        "active": (bool, FieldInfo(default=True, description=DESCRIPTIONS["active"])),
        "external_uac_settings": (
            _ExternalCreate | None,
            FieldInfo(default=None, description="Without it the connection does not register."),
        ),
        "internal_uac_settings": _optional(InternalUacSettings),
        "registration": _optional(RegistrationKnobs, "Registration policy knobs."),
    },
    examples=[
        {
            "connection_name": "Office PBX",
            "external_uac_settings": _EXAMPLE_EXT,
            "internal_uac_settings": {"destination_uri": "1006@assistant-abc123.sip.telnyx.com"},
        }
    ],
)

ConnectionUpdate = _derive(
    ApiFields,
    "ConnectionUpdate",
    "Only the fields sent change; objects merge (RFC 7396), null removes external_uac_settings or resets "
    "internal_uac_settings / registration. connection_name, user_name, password and active may not be null; "
    "user_id cannot change.",
    drop=("user_id",),
    not_null=("connection_name", "user_name", "password", "active"),
    extra={
        "external_uac_settings": (_ExternalPatch | None, FieldInfo(default=None)),
        "internal_uac_settings": (InternalUacSettings | None, FieldInfo(default=None)),
        "registration": (RegistrationKnobs | None, FieldInfo(default=None)),
    },
    examples=[{"internal_uac_settings": {"destination_uri": "2000@cc-app-xyz789.sip.telnyx.com"}}],
)


# -- responses -------------------------------------------------------------------------


class _Exact(BaseModel):
    model_config = ConfigDict(extra="forbid")


Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})] | None
"""UTC ISO 8601 with milliseconds (``2026-01-01T00:00:02.540Z``), or null."""


class ErrorSource(_Exact):
    """pointer: a JSON Pointer into the request body; parameter: a path or query parameter."""

    pointer: str | SkipJsonSchema[None] = Field(None, json_schema_extra=_drop_default)
    parameter: str | SkipJsonSchema[None] = Field(None, json_schema_extra=_drop_default)


class ErrorEntry(_Exact):
    code: Annotated[str, Field(examples=["invalid_value"])]
    title: Annotated[str, Field(examples=["Unprocessable Entity"])]
    detail: Annotated[str, Field(examples=["must be a SIP URI such as sip:pbx.example.com:5060"])]
    source: ErrorSource | SkipJsonSchema[None] = Field(None, json_schema_extra=_drop_default)


class Errors(_Exact):
    """Every error answer: one entry per problem."""

    errors: Annotated[list[ErrorEntry], Field(min_length=1)]


class ConnectionView(_Exact):
    """A connection (seed 000/001/004), never with its passwords."""

    record_type: Literal["uac_connection"]
    id: Annotated[str, Field(description="The connection_id (also the status endpoint's connection_id).")]
    user_id: str
    connection_name: str
    user_name: Annotated[str | None, Field(description="null for config-file connections.")]
    active: bool
    managed_by: Annotated[
        Literal["api", "file"],
        Field(description="file: from the config file, read-only here (409 managed_by_file on PATCH/DELETE)."),
    ]
    external_uac_settings: _ExternalView | None  # type: ignore[valid-type]
    internal_uac_settings: _InternalView  # type: ignore[valid-type]
    registration: Annotated[RegistrationKnobs, Field(description="Per-connection registration policy overrides.")]
    fqdn: Annotated[
        str,
        Field(
            description="host:port of the agent's SIP transport this connection registers from: the address in the "
            "Contact it registers (the Contact also carries ;line=<id>), so where the PBX sends this connection's "
            "calls. The host is sip.bind, or this host's name when sip.bind is a wildcard."
        ),
    ]
    pair_state: Literal["ACTIVE", "INACTIVE"]
    registration_status: Annotated[
        int,
        Field(
            ge=0,
            le=5,
            description="0 Not Applicable, 1 Not Registered, 2 Failed, 3 Expired, 4 Success, 5 Unregistered.",
        ),
    ]
    registered: bool
    last_registration_response: str | None
    registration_status_updated_at: Timestamp
    created_at: Timestamp
    updated_at: Timestamp
    password: Annotated[
        str | SkipJsonSchema[None],
        Field(description="Create response only, when it was generated.", json_schema_extra=_drop_default),
    ] = None


class ConnectionEnvelope(_Exact):
    data: ConnectionView


class PageMeta(_Exact):
    page_number: int
    page_size: int
    total_pages: int
    total_results: int


class ConnectionList(_Exact):
    data: list[ConnectionView]
    meta: PageMeta


class RegistrationSettingsView(_Exact):
    """The connection's external_uac_settings as seed 002 shows them; the password is always ``***``."""

    proxy: str
    outbound_proxy: str | None
    transport: Literal["UDP", "TCP", "TLS"]
    username: str
    auth_username: str
    from_user: str
    expiration_sec: int
    password: Literal["***"]


class DestinationView(_Exact):
    destination_uri: str | None


class RegistrationDetails(_Exact):
    """The agent's own detail of the registration (docs/status-api.md)."""

    state: str
    expires: int | None
    requested_expires: int | None
    binding_expires_at: Timestamp
    uptime: float | None
    registered_since: Timestamp
    next_action: str | None
    next_action_at: Timestamp
    failures: int
    auth_retries: int
    attempts: int
    last_response_code: int
    worker: int | None
    worker_pid: int | None
    registrar_reachable: bool | None
    keepalive_misses: int
    last_keepalive: str | None
    registrar_reachable_since: Timestamp
    target: str | None
    calls_active: int
    destination_reachable: bool | None


class RegistrationStatusView(_Exact):
    """Seed 002's registration status of one connection."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    connection_id: str
    user_id: str
    connection_name: str
    username: str | None
    pair_state: Literal["ACTIVE", "INACTIVE"]
    registered: bool
    last_registration_response: str | None
    third_party_uac_settings: Annotated[RegistrationSettingsView | None, Field(alias="third-party_uac_settings")]
    internal_uac_settings: DestinationView
    registration_status: Annotated[int, Field(ge=0, le=5)]
    registration_status_updated_at: Timestamp
    last_registered_ip: str | None
    sip_registration_details: RegistrationDetails


class Health(_Exact):
    status: Annotated[str, Field(description="ok, or what is wrong", examples=["ok"])]
    sip_thread: bool


class Readiness(_Exact):
    ready: bool
    not_registered: Annotated[list[str], Field(description="Registering connections not registered now, sorted.")]
    reason: str | SkipJsonSchema[None] = Field(None, json_schema_extra=_drop_default)


class AdminStatus(BaseModel):
    """What ``uac-agent status`` shows. Besides these, the agent's own facts (version, pid, workers)."""

    model_config = ConfigDict(extra="allow")

    ready: bool
    health: str
    summary: Annotated[str, Field(examples=["1/2 registered, 1 failing"])]
    connections: list[RegistrationStatusView]


class ReloadReport(BaseModel):
    """What a reload applied (agent/reload.py)."""

    model_config = ConfigDict(extra="allow")

    applied: Literal[True]
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: int
    needs_restart: list[str]


# -- query parameters --------------------------------------------------------------------


class QueryModel(BaseModel):
    """Query parameters of one operation. ``error_status``: what a wrong one answers."""

    error_status: ClassVar[int] = 422
    unknown_code: ClassVar[str] = "unknown_parameter"


NonBlank = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Filter = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3)]


class StatusQuery(QueryModel):
    """Seed 002: all three are required, once each, not blank. Other parameters are ignored."""

    model_config = ConfigDict(extra="ignore")
    error_status: ClassVar[int] = 400

    credential_type: Annotated[
        Literal["uac_third-party_credential", "telephony_credential", "sip_credential_connection"],
        Field(description="uac_third-party_credential is the only type this agent serves (400 for the others)."),
    ]
    connection_id: Annotated[NonBlank, Field(description="The connection's connection_id.")]
    user_id: Annotated[NonBlank, Field(description="Must equal the connection's user_id.")]


class ReadyQuery(QueryModel):
    model_config = ConfigDict(extra="forbid")
    error_status: ClassVar[int] = 400
    unknown_code: ClassVar[str] = "invalid_parameter"

    registered: Annotated[
        Literal["all"] | None,
        Field(description="all: ready only once every registering connection is registered."),
    ] = None


class AdminQuery(QueryModel):
    """No query parameters."""

    model_config = ConfigDict(extra="forbid")
    error_status: ClassVar[int] = 400
    unknown_code: ClassVar[str] = "invalid_parameter"


class NoQuery(QueryModel):
    """No query parameters (seed 004's single-connection operations)."""

    model_config = ConfigDict(extra="forbid")


class ListQuery(QueryModel):
    """Seed 004's list parameters."""

    model_config = ConfigDict(extra="forbid")

    page: Annotated[int, Field(ge=1, le=1_000_000, description="Page number.")] = 1
    per_page: Annotated[int, Field(ge=1, le=1000, description="Page size.")] = 100
    order_by: Annotated[
        Literal["created_at", "connection_name", "active", "registration_status"],
        Field(
            description="created_at: newest first; connection_name: A-Z; active: active first; "
            "registration_status: highest first."
        ),
    ] = "created_at"
    sort_direction: Annotated[Literal["reverse"] | None, Field(description="Invert the order.")] = None
    filter_connection_name: Annotated[Filter | None, Field(description="Partial, case-insensitive match.")] = None
    filter_user_name: Annotated[Filter | None, Field(description="Partial, case-insensitive match of user_name.")] = (
        None
    )
    filter_auth_user_name: Annotated[
        Filter | None, Field(description="Same as filter_user_name (seed 004's name).")
    ] = None
    filter_active: Annotated[
        Literal["true", "false"] | None, Field(description="Only active or only inactive connections.")
    ] = None
    filter_registration_status: Annotated[int | None, Field(ge=0, le=5, description="Exact match.")] = None
    filter_managed_by: Annotated[
        Literal["api", "file"] | None, Field(description="Where the connection comes from.")
    ] = None
    filter_user_id: Annotated[str | None, Field(description="Owner (a user key may only name its own).")] = None


# -- documented error answers --------------------------------------------------------------

ALLOW_HEADER = {"Allow": {"description": "The methods this path serves.", "schema": {"type": "string"}}}


def error_responses(**by_status: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of an operation: each status (``e401="..."``) with its meaning, in the
    errors shape. Every operation also documents 405 (another method on its path), with Allow."""
    out: dict[int | str, dict[str, Any]] = {
        int(status.removeprefix("e")): {"model": Errors, "description": text} for status, text in by_status.items()
    }
    out[405] = {"model": Errors, "description": "Another method on this path.", "headers": ALLOW_HEADER}
    return out


UNAUTHORIZED = "Missing or invalid API key."

BODY_ERRORS = {
    "e400": "No body, or not JSON; or a query string of more than 20 fields.",
    "e411": "The body was sent chunked: send it with a Content-Length.",
    "e413": "The body is larger than 64 KiB.",
    "e415": "Content-Type is not application/json.",
}
