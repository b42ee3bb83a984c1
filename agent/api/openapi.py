"""The OpenAPI 3.1 document served at ``/openapi.json``.

Request schemas come from the same pydantic models that validate requests and
the config file, so a field added there (e.g. to ``internal_uac_settings``)
appears here too; descriptions and the response shapes are written here.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic.json_schema import models_json_schema

from agent import __version__
from agent.api.models import ApiFields
from agent.config import ExternalUacSettings, InternalUacSettings, RegistrationKnobs

__all__ = ["build_openapi"]

REF = "#/components/schemas/{model}"

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


def _describe(schema: dict[str, Any]) -> None:
    for name, prop in schema.get("properties", {}).items():
        if name in DESCRIPTIONS and "description" not in prop:
            prop["description"] = DESCRIPTIONS[name]
        prop.pop("title", None)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _errors_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["errors"],
        "properties": {
            "errors": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["code", "title", "detail"],
                    "properties": {
                        "code": {"type": "string", "examples": ["invalid_value"]},
                        "title": {"type": "string", "examples": ["Unprocessable Entity"]},
                        "detail": {
                            "type": "string",
                            "examples": ["must be a SIP URI such as sip:pbx.example.com:5060"],
                        },
                        "source": {
                            "type": "object",
                            "description": "pointer: a JSON Pointer into the request body; parameter: a path or "
                            "query parameter.",
                            "properties": {"pointer": {"type": "string"}, "parameter": {"type": "string"}},
                        },
                    },
                },
            }
        },
    }


def _connection_schema() -> dict[str, Any]:
    ts = {"type": ["string", "null"], "format": "date-time"}
    return {
        "type": "object",
        "required": [
            "record_type",
            "id",
            "user_id",
            "connection_name",
            "active",
            "managed_by",
            "fqdn",
            "registration_status",
            "created_at",
            "updated_at",
        ],
        "properties": {
            "record_type": {"const": "uac_connection"},
            "id": {"type": "string", "description": "The connection_id (also the status endpoint's connection_id)."},
            "user_id": {"type": "string"},
            "connection_name": {"type": "string"},
            "user_name": {"type": ["string", "null"], "description": "null for config-file connections."},
            "active": {"type": "boolean"},
            "managed_by": {
                "enum": ["api", "file"],
                "description": "file: from the config file, read-only here (409 managed_by_file on PATCH/DELETE).",
            },
            "external_uac_settings": {
                "anyOf": [{"$ref": "#/components/schemas/ExternalUacSettingsView"}, {"type": "null"}]
            },
            "internal_uac_settings": {"type": "object"},
            "registration": {"type": "object", "description": "Per-connection registration policy overrides."},
            "fqdn": {
                "type": "string",
                "description": "host:port of the agent's SIP transport this connection registers from: the address "
                "in the Contact it registers (the Contact also carries ;line=<id>), so where the PBX sends this "
                "connection's calls. The host is sip.bind, or this host's name when sip.bind is a wildcard.",
            },
            "pair_state": {"enum": ["ACTIVE", "INACTIVE"]},
            "registration_status": {
                "type": "integer",
                "minimum": 0,
                "maximum": 5,
                "description": "0 Not Applicable, 1 Not Registered, 2 Failed, 3 Expired, 4 Success, 5 Unregistered.",
            },
            "registered": {"type": "boolean"},
            "last_registration_response": {"type": ["string", "null"]},
            "registration_status_updated_at": ts,
            "created_at": ts,
            "updated_at": ts,
            "password": {"type": "string", "description": "Create response only, when it was generated."},
        },
    }


def build_openapi() -> dict[str, Any]:
    _, defs = models_json_schema(
        [
            (ExternalUacSettings, "validation"),
            (InternalUacSettings, "validation"),
            (RegistrationKnobs, "validation"),
            (ApiFields, "validation"),
        ],
        ref_template=REF,
    )
    schemas: dict[str, Any] = copy.deepcopy(defs.get("$defs", {}))
    for s in schemas.values():
        _describe(s)

    ext = schemas.pop("ExternalUacSettings")
    ext["properties"].pop("password_file", None)
    ext["description"] = "How the agent registers to the PBX (seed 000)."
    create_ext = copy.deepcopy(ext)
    create_ext["properties"]["password"] = {
        "type": "string",
        "format": "password",
        "writeOnly": True,
        "description": "The SIP password for the registration. Never returned.",
    }
    create_ext["required"] = ["proxy", "username", "password"]
    patch_ext = copy.deepcopy(ext)
    patch_ext["required"] = []
    patch_ext["description"] = "Merged into the current settings (RFC 7396): fields sent change, null removes one."
    view_ext = copy.deepcopy(ext)
    view_ext["properties"].pop("password", None)
    view_ext.pop("additionalProperties", None)
    view_ext["description"] = "As sent, without the password."
    schemas["ExternalUacSettingsCreate"] = create_ext
    schemas["ExternalUacSettingsPatch"] = patch_ext
    schemas["ExternalUacSettingsView"] = view_ext

    api = schemas.pop("ApiFields")["properties"]
    internal_ref = {"$ref": "#/components/schemas/InternalUacSettings"}
    knobs_ref = {"$ref": "#/components/schemas/RegistrationKnobs"}
    schemas["ConnectionCreate"] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["connection_name"],
        "properties": {
            "connection_name": api["connection_name"]["anyOf"][0] | {"description": DESCRIPTIONS["connection_name"]},
            "user_name": api["user_name"]["anyOf"][0] | {"description": DESCRIPTIONS["user_name"]},
            "password": api["password"]["anyOf"][0] | {"description": DESCRIPTIONS["password"]},
            "user_id": api["user_id"]["anyOf"][0] | {"description": DESCRIPTIONS["user_id"]},
            "active": {"type": "boolean", "default": True, "description": DESCRIPTIONS["active"]},
            "external_uac_settings": _nullable({"$ref": "#/components/schemas/ExternalUacSettingsCreate"})
            | {"description": "Without it the connection does not register."},
            "internal_uac_settings": internal_ref,
            "registration": knobs_ref,
        },
        "examples": [
            {
                "connection_name": "Office PBX",
                "external_uac_settings": {
                    "proxy": "sip:pbx.example.com:5060",
                    "username": "telnyx-reg",
                    "password": "s3cret",
                    "transport": "TCP",
                },
                "internal_uac_settings": {"destination_uri": "1006@assistant-abc123.sip.telnyx.com"},
            }
        ],
    }
    schemas["ConnectionUpdate"] = {
        "type": "object",
        "additionalProperties": False,
        "description": "Only the fields sent change; objects merge (RFC 7396), null removes external_uac_settings "
        "or resets internal_uac_settings / registration.",
        "properties": {
            "connection_name": api["connection_name"]["anyOf"][0] | {"description": DESCRIPTIONS["connection_name"]},
            "user_name": api["user_name"]["anyOf"][0] | {"description": DESCRIPTIONS["user_name"]},
            "password": api["password"]["anyOf"][0] | {"description": DESCRIPTIONS["password"]},
            "active": {"type": "boolean", "description": DESCRIPTIONS["active"]},
            "external_uac_settings": _nullable({"$ref": "#/components/schemas/ExternalUacSettingsPatch"}),
            "internal_uac_settings": _nullable(internal_ref),
            "registration": _nullable(knobs_ref),
        },
        "examples": [{"internal_uac_settings": {"destination_uri": "2000@cc-app-xyz789.sip.telnyx.com"}}],
    }
    schemas["Connection"] = _connection_schema()
    schemas["ConnectionResponse"] = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"$ref": "#/components/schemas/Connection"}},
    }
    schemas["ConnectionList"] = {
        "type": "object",
        "required": ["data", "meta"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Connection"}},
            "meta": {
                "type": "object",
                "required": ["page_number", "page_size", "total_pages", "total_results"],
                "properties": {
                    "page_number": {"type": "integer"},
                    "page_size": {"type": "integer"},
                    "total_pages": {"type": "integer"},
                    "total_results": {"type": "integer"},
                },
            },
        },
    }
    schemas["Errors"] = _errors_schema()

    def err(desc: str) -> dict[str, Any]:
        return {
            "description": desc,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Errors"}}},
        }

    def ok(desc: str, ref: str) -> dict[str, Any]:
        return {
            "description": desc,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
        }

    common = {
        "401": err("Missing or invalid API key."),
        "405": err("Method not served on this path."),
    }
    body_errors = {
        "400": err("No body, or not JSON."),
        "413": err("Body larger than 64 KiB."),
        "415": err("Content-Type is not application/json."),
        "422": err("A field is wrong: source.pointer names it. Nothing was stored or changed."),
    }
    one = {
        "403": err("The connection belongs to another user than the key's."),
        "404": err("No connection with this id."),
    }
    id_param = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "The connection's id (connection_id).",
    }
    q = [
        ("page", {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 1}, "Page number."),
        ("per_page", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Page size."),
        (
            "order_by",
            {"enum": ["created_at", "connection_name", "active", "registration_status"], "default": "created_at"},
            "created_at: newest first; connection_name: A-Z; active: active first; registration_status: highest first.",
        ),
        ("sort_direction", {"enum": ["reverse"]}, "Invert the order."),
        ("filter_connection_name", {"type": "string", "minLength": 3}, "Partial, case-insensitive match."),
        ("filter_user_name", {"type": "string", "minLength": 3}, "Partial, case-insensitive match of user_name."),
        ("filter_auth_user_name", {"type": "string", "minLength": 3}, "Same as filter_user_name (seed 004's name)."),
        ("filter_active", {"enum": ["true", "false"]}, "Only active or only inactive connections."),
        ("filter_registration_status", {"type": "integer", "minimum": 0, "maximum": 5}, "Exact match."),
        ("filter_managed_by", {"enum": ["api", "file"]}, "Where the connection comes from."),
        ("filter_user_id", {"type": "string"}, "Owner (a user key may only name its own)."),
    ]
    list_params = [{"name": n, "in": "query", "required": False, "schema": s, "description": d} for n, s, d in q]

    by_id = {"id": "$response.body#/data/id"}
    links = {
        name: {"operationId": op, "parameters": by_id}
        for name, op in (
            ("GetConnection", "getUacConnection"),
            ("UpdateConnection", "updateUacConnection"),
            ("DeleteConnection", "deleteUacConnection"),
            ("RegisterConnection", "registerUacConnection"),
            ("UnregisterConnection", "unregisterUacConnection"),
        )
    }
    paths: dict[str, Any] = {
        "/v2/uac_connections": {
            "get": {
                "operationId": "listUacConnections",
                "summary": "List connections (the key's user's; every user's with the operator key)",
                "parameters": list_params,
                "responses": {
                    "200": ok("A page of connections.", "ConnectionList"),
                    "403": err("filter_user_id names another user than the key's."),
                    "422": err("A query parameter is wrong: source.parameter names it."),
                    **common,
                },
            },
            "post": {
                "operationId": "createUacConnection",
                "summary": "Create a connection; it starts registering within a second",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ConnectionCreate"}}},
                },
                "responses": {
                    "201": ok("Created. password is included once when it was generated.", "ConnectionResponse")
                    | {"links": links},
                    "403": err("user_id names another user than the key's."),
                    "409": err("More registering connections than workers.max_connections, or the store is full."),
                    "503": err("A worker or the store is unavailable; nothing was changed."),
                    **body_errors,
                    **common,
                },
            },
        },
        "/v2/uac_connections/{id}": {
            "parameters": [id_param],
            "get": {
                "operationId": "getUacConnection",
                "summary": "Retrieve a connection",
                "responses": {"200": ok("The connection.", "ConnectionResponse"), **one, **common},
            },
            "patch": {
                "operationId": "updateUacConnection",
                "summary": "Update a connection: only the fields sent change",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ConnectionUpdate"}}},
                },
                "responses": {
                    "200": ok("Updated (and applied).", "ConnectionResponse"),
                    "409": err("Config-file connection (read-only here), or the connection limit."),
                    "503": err("A worker or the store is unavailable; nothing was changed."),
                    **one,
                    **body_errors,
                    **common,
                },
            },
            "delete": {
                "operationId": "deleteUacConnection",
                "summary": "Unregister, then delete a connection",
                "responses": {
                    "200": ok("Deleted; the connection as it was.", "ConnectionResponse"),
                    "409": err("Config-file connection: remove it from the file and reload."),
                    "503": err("The workers or the store are unavailable."),
                    **one,
                    **common,
                },
            },
        },
    }
    for action, code, summary in (
        ("register", "202", "Register (refresh) now; restarts a connection stopped by unregister"),
        ("unregister", "200", "Unregister now and stay unregistered until register, a change, or a restart"),
    ):
        paths[f"/v2/uac_connections/{{id}}/actions/{action}"] = {
            "parameters": [id_param],
            "post": {
                "operationId": f"{action}UacConnection",
                "summary": summary,
                "responses": {
                    code: ok("Done (register: the REGISTER is on its way).", "ConnectionResponse"),
                    "400": err("The body is not JSON."),
                    "409": err("The connection keeps no registration (inactive or without external settings)."),
                    "413": err("Body larger than 64 KiB."),
                    "415": err("Content-Type is not application/json."),
                    "422": err("A query parameter was sent, or the body is not an object."),
                    "503": err("The connection's worker is unavailable (stopping or being replaced)."),
                    **one,
                    **common,
                },
            },
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "uac-agent UAC Connections API",
            "version": __version__,
            "description": "Create, list, retrieve, update and delete the agent's UAC connections at runtime "
            '(seeds 000/001/004). Bodies use the {"data": ...} envelope; errors are {"errors": [{code, title, '
            "detail, source}]}. Passwords are never returned, except a generated one once in the create response. "
            "Config-file connections are listed but read-only. See docs/api.md.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
    }
