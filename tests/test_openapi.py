"""GET /api/openapi.json describes every endpoint, from the pydantic models."""
import re

from pydantic.json_schema import models_json_schema

from chatbot import models
from chatbot.openapi import OPERATIONS


def described_operations(doc):
    return {(path, method.upper()) for path, item in doc["paths"].items() for method in item}


def api_rules(app):
    """The URL map without the chat page and its files (chatbot/web.py): not API endpoints."""
    return [r for r in app.url_map.iter_rules() if r.endpoint != "static" and not r.endpoint.startswith("web.")]


def routes(app):
    found = set()
    for rule in api_rules(app):
        path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)
        found |= {(path, method) for method in rule.methods - {"HEAD", "OPTIONS"}}
    return found


def test_every_route_is_described_and_nothing_else(app, client):
    doc = client.get("/api/openapi.json").json
    assert doc["openapi"].startswith("3.1")
    assert described_operations(doc) == routes(app)
    assert set(OPERATIONS) == {r.endpoint for r in api_rules(app)}


def test_path_parameters_are_declared(client):
    doc = client.get("/api/openapi.json").json
    for path, item in doc["paths"].items():
        names = set(re.findall(r"{([^}]+)}", path))
        for operation in item.values():
            assert {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"} == names


def test_the_schemas_are_the_models_with_the_configured_limits(make_app):
    app = make_app(MAX_MESSAGE_CHARS=123, MAX_NEW_TOKENS_LIMIT=77, TEMPERATURE_LIMIT=1.5,
                   SYSTEM_PROMPT_MAX_CHARS=99)
    doc = app.test_client().get("/api/openapi.json").json
    schemas = doc["components"]["schemas"]
    with app.app_context():
        _, expected = models_json_schema([(models.ChatRequest, "validation"), (models.Message, "serialization")],
                                         ref_template="#/components/schemas/{model}")
    assert schemas["ChatRequest"] == expected["$defs"]["ChatRequest"]
    assert schemas["Message"] == expected["$defs"]["Message"]
    chat = schemas["ChatRequest"]["properties"]
    assert chat["message"]["anyOf"][0]["maxLength"] == 123
    assert chat["max_new_tokens"]["anyOf"][0]["maximum"] == 77
    assert chat["temperature"]["anyOf"][0]["maximum"] == 1.5
    assert schemas["CreateSession"]["properties"]["system_prompt"]["anyOf"][0]["maxLength"] == 99
    assert doc["paths"]["/api/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ChatRequest"}


def test_query_strings_are_described_from_their_models(client):
    doc = client.get("/api/openapi.json").json
    listing = {p["name"]: p for p in doc["paths"]["/api/sessions"]["get"]["parameters"]}
    assert set(listing) == set(models.SessionsQuery.model_fields)
    assert listing["limit"]["in"] == "query" and listing["limit"]["schema"]["minimum"] == 1
    export = {p["name"]: p for p in doc["paths"]["/api/sessions/{session_id}/export"]["get"]["parameters"]}
    assert export["format"]["schema"]["enum"] == ["json", "markdown"]


def test_every_error_is_documented_as_problem_json(client):
    doc = client.get("/api/openapi.json").json
    for item in doc["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if operation["operationId"].startswith("openai_api."):   # OpenAI's shape, by the contract
                    assert int(status) < 400 or response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/OpenAIError"}
                elif int(status) >= 400 and operation["operationId"] != "health.health":
                    assert list(response["content"]) == ["application/problem+json"]


def test_keys_are_described_when_they_are_required(make_app):
    secured = make_app(AUTH="required").test_client().get("/api/openapi.json").json
    assert secured["security"] == [{"bearer": []}]
    assert secured["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "401" in secured["paths"]["/api/chat"]["post"]["responses"]
    assert secured["paths"]["/api/health"]["get"]["security"] == []
    assert "401" not in secured["paths"]["/api/health"]["get"]["responses"]

    open_doc = make_app(AUTH="disabled").test_client().get("/api/openapi.json").json
    assert "security" not in open_doc
    assert "401" not in open_doc["paths"]["/api/chat"]["post"]["responses"]


def test_a_real_answer_matches_its_model(client, session_id):
    # The fuzz test checks this for every endpoint; here one plain case, fast.
    reply = client.post("/api/chat", json={"session_id": session_id, "message": "hi"}).json
    models.Message.model_validate(reply)
    models.Session.model_validate(client.get(f"/api/sessions/{session_id}").json)
    models.Problem.model_validate(client.get("/api/sessions/nope").json)
