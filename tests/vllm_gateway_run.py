"""grok-serve's OpenAI gateway driven over HTTP (ASGI, in process) with a list of request bodies.

tests/test_vllm_plugin.py sends the same bodies to the gateway on the native engine (in its process)
and, through this file run as a script in the vLLM virtualenv, on the vLLM engine backend
(services/vllm_plugin/engine_client.py), then compares the answers.

    python tests/vllm_gateway_run.py CHECKPOINT_DIR BODIES_JSON OUT_JSON
"""
from __future__ import annotations

import asyncio
import json
import sys


async def answer(client, config, bodies: list[dict]) -> dict:
    """Non-streamed bodies are sent together (the engine batches them); then streamed ones, one by one.
    A streamed answer is {"status", "text" (joined), "finish_reason"}."""
    import httpx

    from services.gateway.openai_api import build_context, create_app

    app = create_app(build_context(config, client))
    answers: list = [None] * len(bodies)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                 timeout=300) as http:
        async def post(i: int) -> None:
            r = await http.post("/v1/completions", json={"model": config.model_name, **bodies[i]})
            answers[i] = {"status": r.status_code, "body": r.json()}

        await asyncio.gather(*(post(i) for i, b in enumerate(bodies) if not b.get("stream")))
        for i, body in enumerate(bodies):
            if not body.get("stream"):
                continue
            texts, finish = [], None
            async with http.stream("POST", "/v1/completions", json={"model": config.model_name, **body}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        for choice in json.loads(line[6:])["choices"]:
                            texts.append(choice["text"])
                            finish = choice.get("finish_reason") or finish
            answers[i] = {"status": r.status_code, "text": "".join(texts), "finish_reason": finish}
        metrics = (await http.get("/metrics")).text
    return {"answers": answers, "metrics": metrics}


def gateway_config(checkpoint: str, backend: str):
    from services.engine.config import EngineConfig
    from services.gateway.config import AppConfig

    return AppConfig(engine=EngineConfig(model=checkpoint, backend=backend, dtype="float32", max_model_len=256,
                                         max_num_seqs=8, kv_cache_memory_bytes=1 << 30))


async def run(checkpoint: str, bodies: list[dict]) -> dict:
    from services.vllm_plugin.engine_client import VllmEngineClient

    config = gateway_config(checkpoint, "vllm")
    client = VllmEngineClient(config.engine)
    try:
        return await answer(client, config, bodies)
    finally:
        await client.shutdown()


if __name__ == "__main__":
    checkpoint_dir, bodies_file, out_file = sys.argv[1:4]
    with open(bodies_file) as f:
        request_bodies = json.load(f)
    result = asyncio.run(run(checkpoint_dir, request_bodies))
    with open(out_file, "w") as f:
        json.dump(result, f)
