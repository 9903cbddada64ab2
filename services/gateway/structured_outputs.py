"""The structured-output fields of a request, as one engine constraint (services/engine/structured_output.py).

OpenAI's `response_format` (`text`, `json_object`, `json_schema` with its `schema`; `strict` is accepted
and always honoured, since the output is constrained either way), vLLM's older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and its newer `structured_outputs` object with
`json`, `regex`, `choice`, `grammar` or `json_object`. A request may use one of them; two are a 400,
since which one should win is not clear.
"""
from __future__ import annotations

from services.engine.api import Rejection, RequestRejected
from services.engine.structured_output import StructuredOutput
from services.gateway import protocol as p


def _from_response_format(fmt: p.ResponseFormat) -> StructuredOutput | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput.json_object("response_format")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise RequestRejected(Rejection("response_format of type json_schema needs json_schema.schema",
                                        "response_format"))
    return StructuredOutput.json_schema(fmt.json_schema.schema_, "response_format")


def _from_vllm(body: p.SamplingFields) -> list[StructuredOutput]:
    found = []
    if body.guided_json is not None:
        found.append(StructuredOutput.json_schema(body.guided_json, "guided_json"))
    if body.guided_regex is not None:
        found.append(StructuredOutput("regex", body.guided_regex, "guided_regex"))
    if body.guided_choice is not None:
        found.append(StructuredOutput.choice(body.guided_choice, "guided_choice"))
    if body.guided_grammar is not None:
        found.append(StructuredOutput("grammar", body.guided_grammar, "guided_grammar"))
    so = body.structured_outputs
    if so is not None:
        param = "structured_outputs"
        if so.json_ is not None:
            found.append(StructuredOutput.json_schema(so.json_, param))
        if so.regex is not None:
            found.append(StructuredOutput("regex", so.regex, param))
        if so.choice is not None:
            found.append(StructuredOutput.choice(so.choice, param))
        if so.grammar is not None:
            found.append(StructuredOutput("grammar", so.grammar, param))
        if so.json_object:
            found.append(StructuredOutput.json_object(param))
    return found


def request_constraint(body: p.SamplingFields) -> StructuredOutput | None:
    """The request's one structured-output constraint, or None; RequestRejected naming the field."""
    found = _from_vllm(body)
    if body.response_format is not None:
        constraint = _from_response_format(body.response_format)
        if constraint is not None:
            found.insert(0, constraint)
    if len(found) > 1:
        fields = ", ".join(dict.fromkeys(c.param for c in found))
        raise RequestRejected(Rejection(f"give at most one structured-output constraint; this request has "
                                        f"{len(found)} ({fields})", found[1].param))
    return found[0] if found else None
