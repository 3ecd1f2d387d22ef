"""`gptcore serve MODEL --port N`: an OpenAI-compatible HTTP API over one model folder.

    POST /v1/completions        {"prompt": "def add(", "max_tokens": 32, "temperature": 0, "stream": false}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], "stream": true}
    GET  /v1/models             the one model served

Completions continue the prompt as raw text; chat completions wrap the user turns in the model's
fine-tuning template (`Session.chat_ids`). `stream: true` answers with server-sent events, one
`data: {chunk}` per piece of text and `data: [DONE]` at the end, as OpenAI's API does, so the
`openai` client and tools that speak that API work unchanged. One generation runs at a time.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Iterator, Optional, Union

from pydantic import BaseModel, Field

from gptcore.serving.session import Reply, Session


class Sampling(BaseModel):
    """The sampling fields both endpoints share (OpenAI's names and defaults)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, gt=0)  # not OpenAI's, but common in local servers
    repetition_penalty: float = Field(1.0, gt=0)  # likewise (vLLM's name); 1 = off
    no_repeat_ngram_size: int = Field(0, ge=0)  # transformers' name; 0 = off
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]] = ""


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)


def max_new_tokens(req: Sampling) -> int:
    """OpenAI's defaults: 16 tokens for a completion; a chat reply runs to the end of its turn (256 here)."""
    if req.max_tokens is not None:
        return req.max_tokens
    return 16 if isinstance(req, CompletionRequest) else 256


def create_app(session: Session):
    """The FastAPI app serving `session`."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="gptcore", description=f"OpenAI-compatible API for {session.name}")
    lock = threading.Lock()  # one generation at a time: the model is not shared across threads

    def error(status: int, message: str):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    def run(req: Sampling, ids: list[int], reply: Reply) -> Iterator[str]:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        with lock:
            yield from session.stream(ids, max_new_tokens(req), req.temperature, req.top_k,
                                      None if req.top_p >= 1 else req.top_p, req.seed, stop, reply,
                                      repetition_penalty=req.repetition_penalty,
                                      no_repeat_ngram_size=req.no_repeat_ngram_size)

    def usage(reply: Reply) -> dict:
        return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.tokens,
                "total_tokens": reply.prompt_tokens + reply.tokens}

    def sse(chunks: Iterator[dict]) -> StreamingResponse:
        def events():
            for c in chunks:
                yield f"data: {json.dumps(c)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def room(req: Sampling) -> int:
        return min(max_new_tokens(req), session.block_size // 2)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": session.name, "object": "model", "owned_by": "gptcore"}]}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            return error(400, "give one prompt per request")
        tok = session.tokenizer
        ids = (tok.encode(prompts[0], allowed_special="all") or [tok.eot_id])[-max(1, session.block_size - room(req)):]
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": session.name}
        reply = Reply()
        if req.stream:
            def chunks():
                for piece in run(req, ids, reply):
                    yield {**head, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]}
                yield {**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": reply.finish_reason}]}
            return sse(chunks())
        text = "".join(run(req, ids, reply))
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reply.finish_reason}],
                "usage": usage(reply)}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        turns = [m for m in req.messages if m.role != "system"]  # the template has its own preamble
        if not turns or turns[-1].role != "user":
            return error(400, "the last message must come from the user")
        history, pending = [], None
        for m in turns[:-1]:
            if m.role == "user":
                pending = m.content
            elif m.role == "assistant":
                history.append((pending or "", m.content))
                pending = None
        ids = session.chat_ids(history, turns[-1].content, room=room(req))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": session.name}
        reply = Reply()
        if req.stream:
            def chunks():
                chunk = {**head, "object": "chat.completion.chunk"}
                yield {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                for piece in run(req, ids, reply):
                    yield {**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                yield {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]}
            return sse(chunks())
        text = "".join(run(req, ids, reply))
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": reply.finish_reason}], "usage": usage(reply)}

    return app


def serve(session: Session, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until Ctrl-C / SIGTERM (uvicorn shuts down cleanly on both)."""
    import uvicorn

    print(f"serving {session.name} on http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(session), host=host, port=port, log_level="warning")

