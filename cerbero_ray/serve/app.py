"""The serving app: a Ray Serve deployment behind a FastAPI ingress.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (OpenAI-compatible, with
server-sent-event streaming), ``GET /v1/models``, ``POST /v1/label`` (the batch job's scorer),
``POST /tokenize`` and ``/detokenize`` (vLLM's), ``GET /health``, ``GET /ready``, and ``GET /``
(a small chat page).

Concurrent requests are batched: with ``engine=continuous`` (the default) every generation request,
streaming or not, joins the replica's running decode batch (up to ``max_batch_size``) between two
steps; with ``engine=hf``, and for labeling, ``@serve.batch`` gathers up to ``max_batch_size``
requests, waiting at most ``batch_wait_timeout_s``. A replica loads the model once. Overload is Ray Serve's
backpressure: past ``max_ongoing_requests`` per replica and ``max_queued_requests`` queued, a
request is answered ``overload_status`` (503 or 429) with ``Retry-After``. Replicas scale between
``min_replicas`` and ``max_replicas`` on ongoing requests.

    serve run cerbero_ray.serve.app:build_app checkpoint=outputs/train/tiny-cpu/hf
    python jobs/serve.py                         # the same, from conf/serve.yaml
"""

# no `from __future__ import annotations`: Serve's ingress reads the route signatures at runtime,
# and string annotations would turn `request: Request` into a query parameter
import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cerbero_ray.chat import ROLE_TAGS, STOP_STRING, forges_turn
from cerbero_ray.config.label_task import LabelTask
from cerbero_ray.config.serve import ServeConfig
from cerbero_ray.inference.sampling import Sampling
from cerbero_ray.serve.guard import Guard, configure_guard
from cerbero_ray.serve.schemas import (
    MAX_STOP,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    LabelRequest,
    TokenizeRequest,
    duplicate_key,
    error_body,
    short,
)

app = FastAPI(title="cerbero-ray", docs_url="/docs")
PAGE = os.path.join(os.path.dirname(__file__), "static", "chat.html")

app.add_middleware(Guard)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        self.status, self.body = (
            status,
            error_body(message, "invalid_request_error" if status < 500 else "server_error", param, code),
        )


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body, status_code=exc.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # FastAPI's own refusals (an undecodable body, an unknown route, a wrong method), in our error format
    message = "the body is not valid JSON (or not UTF-8)" if "parsing the body" in str(exc.detail) else str(exc.detail)
    return JSONResponse(
        error_body(message, code=str(exc.status_code)),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


# an error that only says the value is not of one member of a union ("Input should be a valid
# string" for a list given to `str | list[str]`): another error of the same field says more
_WRONG_BRANCH = {"string_type", "list_type", "dict_type", "model_type", "int_type", "float_type", "bool_type"}


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    errors = exc.errors() or [{}]
    first = next((e for e in errors if e.get("type") not in _WRONG_BRANCH), errors[0])
    # pydantic names the member of a union it tried ("list[...]", "str"): not part of the field's path
    union = ("str", "int", "float", "bool", "list", "dict")
    loc = [x for x in first.get("loc", ()) if x != "body" and "[" not in str(x) and x not in union]
    kind = first.get("type", "")
    if kind == "json_invalid":  # loc: the character offset, which is no field
        at = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
        message, loc = f"the body is not valid JSON{at} (or not UTF-8)", []
    where = ".".join(str(x) if len(str(x)) <= 64 else short(str(x)) for x in loc)
    if kind == "extra_forbidden":
        message = f"unknown field {where!r}"
    elif kind != "json_invalid":
        message = f"{where or 'body'}: {first.get('msg', 'invalid')}"
    return JSONResponse(error_body(message, param=where or None, code=kind or None), status_code=400)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _choice(
    kind: str, text: str, finish: str | None, delta: bool = False, logprobs: list | None = None, index: int = 0
) -> dict:
    if kind == "chat" and delta:
        body = {"delta": {"role": "assistant", "content": text} if text else {}}
    elif kind == "chat":
        body = {"message": {"role": "assistant", "content": text}}
    else:
        body = {"text": text, "logprobs": None}
    if kind == "chat":
        body["logprobs"] = {"content": logprobs} if logprobs is not None else None
    return {"index": index, **body, "finish_reason": finish}


def _token(tok, token_id: int) -> tuple[str, list[int]]:
    """A token's text and bytes as OpenAI reports them (SentencePiece's ``▁`` is a space; a byte
    token ``<0x0A>`` is that byte)."""
    piece = tok.convert_ids_to_tokens(token_id)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        raw = bytes([int(piece[3:5], 16)])
        return raw.decode("utf-8", "replace"), list(raw)
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def openai_logprobs(tok, entries: list[dict]) -> list[dict]:
    """The engine's per-token entries (``id``, ``logprob``, ``top``) as OpenAI's ``logprobs.content``."""
    out = []
    for e in entries:
        text, raw = _token(tok, e["id"])
        top = []
        for i, lp in e["top"]:
            t, b = _token(tok, i)
            top.append({"token": t, "logprob": lp, "bytes": b})
        out.append({"token": text, "logprob": e["logprob"], "bytes": raw, "top_logprobs": top})
    return out


CHOICE_SEED_STEP = 1_000_003  # choice i of a seeded request with n > 1 draws with seed + i x this


def _choices(s: Sampling, n: int) -> list[Sampling]:
    """The sampling settings of each of ``n`` choices: the first is the request's own (so choice 0
    is what the request with n=1 answers), each other one seeded apart (or unseeded, as the request)."""
    return [s if i == 0 or s.seed is None else replace(s, seed=s.seed + i * CHOICE_SEED_STEP) for i in range(n)]


async def _merged(streams: list):
    """(index, item) from several async iterators as they come; closing it (a client that left)
    cancels every one that is still running."""
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i, it):
        try:
            async for x in it:
                await q.put((i, x))
        except Exception as e:  # the engine's error reaches the client's stream as for n=1
            await q.put((i, e))
        finally:
            await q.put((i, end))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, x = await q.get()
            if x is end:
                left -= 1
            elif isinstance(x, Exception):
                raise x
            else:
                yield i, x
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(first: dict, new: int) -> dict:
    """OpenAI's usage of a request whose first choice ended with ``first`` and whose choices
    generated ``new`` tokens in all; the continuous engine adds how many of the prompt's tokens
    it reused from a cache slot (prefix reuse) as OpenAI's ``prompt_tokens_details.cached_tokens``."""
    prompt = first["prompt_tokens"]
    out = {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}
    if "cached_tokens" in first:
        out["prompt_tokens_details"] = {"cached_tokens": first["cached_tokens"]}
    return out


def _envelope(kind: str, rid: str, model: str, choices: list, usage: dict | None, chunk: bool = False) -> dict:
    obj = (
        "chat.completion.chunk"
        if kind == "chat" and chunk
        else "chat.completion"
        if kind == "chat"
        else "text_completion"
    )
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def _content(content, i: int) -> str:
    """A message's content as text: a string, or OpenAI's list of parts, whose text parts are
    joined by newlines (any other part is refused, naming it)."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(
                400,
                f"content part of type {short(part.type)} is not supported: only text parts "
                '({"type": "text", "text": "..."}); this model reads text only',
                f"messages.{i}.content.{j}",
            )
        texts.append(part.text)
    return "\n".join(texts)


@serve.deployment
@serve.ingress(app)
class CerberoServer:
    def __init__(self, sc: ServeConfig):
        from cerbero_ray.config.label_task import task_from_dict
        from cerbero_ray.serve.engine import ServeEngine

        self.sc = sc
        self._task_tokens: OrderedDict[str, int] = OrderedDict()  # inline task key -> tokens per text
        tasks = {name: task_from_dict(t) for name, t in sc.label_tasks.items()}
        self.engine = ServeEngine(
            sc.checkpoint,
            sc.dtype,
            tasks,
            sc.max_batch_size,
            sc.max_prompt_tokens,
            engine=sc.engine,
            max_new_tokens=sc.max_new_tokens,
            prefill_tokens=sc.prefill_tokens,
            cuda_graphs=sc.cuda_graphs,
            fast_decode=sc.fast_decode,
            decode_attention=sc.decode_attention,
            graph_batch_sizes=sc.graph_batch_sizes,
            prefix_cache=sc.prefix_cache,
            prefix_store_gib=sc.prefix_store_gib,
            adapters=sc.adapters,
            model_name=sc.model_name,
        )
        for method in (self._generate_batch, self._label_batch):
            method.set_max_batch_size(sc.max_batch_size)
            method.set_batch_wait_timeout_s(sc.batch_wait_timeout_s)
        self.key = sc.api_key or os.environ.get("CERBERO_API_KEY") or None
        configure_guard(self.key, sc.max_body_bytes)
        if self.engine.batcher is not None:  # how it decodes, in the replica's log (Serve's logger)
            logging.getLogger("ray.serve").info(self.engine.batcher.describe())
        self.created = int(time.time())
        self.vocab = self.engine.model.get_output_embeddings().weight.shape[0]  # token ids 0..vocab - 1
        from cerbero_ray.serve.metrics import ServeMetrics

        self.metrics = ServeMetrics()  # tokens, time to first token, slots in use: through Ray's metrics agent
        if self.engine.batcher is not None:
            self.engine.batcher.on_step = self.metrics.load_hook(self.engine.batcher)

    # ── plumbing ────────────────────────────────────────────────────────────
    def _auth(self, request: Request) -> None:
        if self.key and request.headers.get("authorization", "") != f"Bearer {self.key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key")

    def _served(self) -> list[str]:
        return [self.sc.model_name, *self.sc.adapters]

    def _adapter(self, model: str | None) -> tuple[int, str]:
        """(adapter index, the model's name) for a request's ``model`` (None: the base); 404 when
        this server does not serve it."""
        if model in (None, self.sc.model_name):
            return 0, self.sc.model_name
        try:
            return self.engine.adapter_index(model), model
        except KeyError:
            raise APIError(
                404,
                f"model {short(model)} is not served here; this server has {self._served()}",
                "model",
                "model_not_found",
            ) from None

    async def _sampling(self, req, prompt: str) -> tuple[Sampling, list[int]]:
        """The request's sampling settings and its prompt's ids (encoded off the event loop, once)."""
        sc = self.sc
        self._adapter(req.model)
        if not prompt.strip():
            raise APIError(400, "the prompt is empty", "messages" if isinstance(req, ChatRequest) else "prompt")
        ids = await asyncio.to_thread(self.engine.encode, prompt)  # a long prompt never holds the loop
        n = len(ids)
        if n > sc.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {n} tokens; the limit is {sc.max_prompt_tokens}",
                "messages" if isinstance(req, ChatRequest) else "prompt",
                "context_length_exceeded",
            )
        mct = getattr(req, "max_completion_tokens", None)
        if mct is not None and req.max_tokens is not None and mct != req.max_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens differ; give one", "max_completion_tokens")
        field = "max_completion_tokens" if mct is not None else "max_tokens"
        max_tokens = mct or req.max_tokens or sc.default_max_tokens
        if max_tokens > sc.max_new_tokens:
            raise APIError(400, f"{field} {short(max_tokens)} is over this server's limit {sc.max_new_tokens}", field)
        bias = None
        if req.logit_bias:
            vocab = self.vocab
            bad = next(
                (k for k in req.logit_bias if not (k.isascii() and k.isdigit() and len(k) < 10 and int(k) < vocab)),
                None,
            )
            if bad is not None:
                raise APIError(
                    400, f"logit_bias: {short(bad)} is not a token id of this model (0..{vocab - 1})", "logit_bias"
                )
            bias = {int(k): v for k, v in req.logit_bias.items()}
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options needs stream: true", "stream_options")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} strings, got {len(stop)}", "stop")
        logprobs = None
        if getattr(req, "logprobs", False):
            if self.engine.batcher is None:
                raise APIError(400, "logprobs needs serve.engine=continuous (this server runs engine=hf)", "logprobs")
            logprobs = req.top_logprobs or 0
        elif getattr(req, "top_logprobs", None) is not None:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        s = Sampling(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=list(dict.fromkeys([STOP_STRING, *stop])),
            seed=req.seed,
            logprobs=logprobs,
            grammar=await self._grammar(req),
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            logit_bias=bias,
        )
        return s, ids

    async def _grammar(self, req) -> str | None:
        """The request's constraint as a grammar (``response_format`` json_object / json_schema, or
        vLLM's ``guided_choice`` / ``guided_regex`` / ``guided_json``), compiled off the event loop
        and cached; a 400 naming the field and the problem when it cannot run."""
        from cerbero_ray.inference import grammar as G

        asked = []
        rf = getattr(req, "response_format", None)
        if rf is not None and rf.type != "text":
            if rf.type == "json_object":
                asked.append(("response_format", "json_object", None))
            elif rf.type == "json_schema":
                js = rf.json_schema
                if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                    raise APIError(
                        400,
                        "response_format json_schema needs json_schema.schema, an object",
                        "response_format.json_schema",
                    )
                asked.append(("response_format.json_schema.schema", "json_schema", js["schema"]))
            else:
                raise APIError(
                    400,
                    f"response_format {short(rf.type)}: one of text, json_object, json_schema",
                    "response_format.type",
                )
        if req.guided_choice is not None:
            asked.append(("guided_choice", "choice", req.guided_choice))
        if req.guided_regex is not None:
            asked.append(("guided_regex", "regex", req.guided_regex))
        if req.guided_json is not None:
            value = req.guided_json
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise APIError(400, "guided_json is not valid JSON", "guided_json") from None
            asked.append(("guided_json", "json_schema", value))
        if not asked:
            return None
        if len(asked) > 1:
            raise APIError(400, f"give one constraint, not {len(asked)}: {', '.join(a[0] for a in asked)}", asked[1][0])
        param, kind, value = asked[0]
        if self.engine.batcher is None:
            raise APIError(
                400, "constrained decoding needs serve.engine=continuous (this server runs engine=hf)", param
            )

        def build():
            g = G.grammar(kind, value)
            G.check(self.engine.tok, g)
            return g

        try:
            return await asyncio.to_thread(build)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param) from None

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, items: list[tuple[str, Sampling]]) -> list[dict]:
        return await asyncio.to_thread(self.engine.generate, items)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _label_batch(self, items: list[tuple[str, list[str], int, LabelTask | None]]) -> list[list[dict]]:
        return await asyncio.to_thread(self.engine.label, items)

    def _stream(
        self,
        prompt: str,
        ids: list[int],
        samplings: list[Sampling],
        kind: str,
        rid: str,
        include_usage: bool = False,
        adapter: tuple[int, str] = (0, ""),
        salt: str | None = None,
    ):
        """Server-sent events, each choice's pieces under its ``index`` as they come. The usage (every
        choice's tokens) rides on the last finishing chunk; with ``stream_options.include_usage`` it
        comes as OpenAI sends it instead: a last chunk of its own, with no choices."""
        (index, model), tok, s = adapter, self.engine.tok, samplings[0]
        t0, first, ends = time.perf_counter(), {}, {}  # each choice's first piece and its end, as they come

        def seen(i: int, piece) -> None:  # the metrics' view: each choice's first piece and its end
            if isinstance(piece, dict):
                ends[i] = {"first_token_s": first.get(i), **piece}  # the engine's own time, where it has one
                if len(ends) == len(samplings):
                    self.metrics.generated(model, kind, list(ends.values()), time.perf_counter() - t0)
            elif i not in first:
                first[i] = time.perf_counter() - t0

        def sse(i: int, piece) -> str:  # after seen(i, piece)
            if isinstance(piece, dict):
                last = _choice(kind, "", piece["finish_reason"], delta=True, index=i)
                done = len(ends) == len(samplings)  # the last choice to finish carries every choice's usage
                usage = _usage(ends[0], sum(e["new_tokens"] for e in ends.values())) if done else None
                if include_usage:
                    tail = _sse(_envelope(kind, rid, model, [], usage, chunk=True)) if usage else ""
                    return _sse(_envelope(kind, rid, model, [last], None, chunk=True)) + tail
                return _sse(_envelope(kind, rid, model, [last], usage, chunk=True))
            lps = openai_logprobs(tok, piece.logprobs) if s.logprobs is not None else None
            return _sse(_envelope(kind, rid, model, [_choice(kind, piece, None, True, lps, i)], None, chunk=True))

        if self.engine.batcher is not None:

            async def events():  # on the event loop: no thread per open stream
                streams = [self.engine.batcher.astream(prompt, x, ids, index, salt) for x in samplings]
                try:
                    async for i, piece in _merged(streams):
                        seen(i, piece)
                        yield sse(i, piece)
                except Exception:
                    self.metrics.failed(model, kind)
                    raise
                yield "data: [DONE]\n\n"
        else:  # one choice (n > 1 streams need the continuous engine: refused before)

            def events():
                try:
                    for piece in self.engine.stream(prompt, s):
                        seen(0, piece)
                        yield sse(0, piece)
                except Exception:
                    self.metrics.failed(model, kind)
                    raise
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _complete(self, request: Request, req, prompt: str, kind: str):
        self._auth(request)
        s, ids = await self._sampling(req, prompt)
        index, model = self._adapter(req.model)
        if req.n > self.sc.max_choices:
            raise APIError(400, f"n {req.n} is over this server's limit {self.sc.max_choices} (serve.max_choices)", "n")
        if req.n > 1 and req.stream and self.engine.batcher is None:
            raise APIError(400, "n > 1 with stream: true needs serve.engine=continuous (this server runs hf)", "n")
        samplings = _choices(s, req.n)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(prompt, ids, samplings, kind, rid, usage, (index, model), req.cache_salt)
        t0 = time.perf_counter()
        try:
            if self.engine.batcher is not None:  # joins the running batch (every adapter's) at the next step
                answers = [self.engine.batcher.agenerate(prompt, x, ids, index, req.cache_salt) for x in samplings]
            else:
                answers = [self._generate_batch((prompt, x)) for x in samplings]
            rs = await asyncio.gather(*answers)
        except Exception:
            self.metrics.failed(model, kind)
            raise
        self.metrics.generated(model, kind, rs, time.perf_counter() - t0)
        choices = []
        for i, r in enumerate(rs):
            lps = openai_logprobs(self.engine.tok, r["logprobs"]) if s.logprobs is not None else None
            choices.append(_choice(kind, r["text"], r["finish_reason"], logprobs=lps, index=i))
            if "constraint" in r:  # a constrained answer says whether it reached its grammar's end
                choices[-1]["constraint"] = r["constraint"]
        return _envelope(kind, rid, model, choices, _usage(rs[0], sum(r["new_tokens"] for r in rs)))

    # ── endpoints ───────────────────────────────────────────────────────────
    async def _render(self, raw: list) -> str:
        """A chat's messages as the prompt the model reads, refused (400, naming the message) where
        they cannot be one."""
        messages = [{"role": m.role, "content": _content(m.content, i)} for i, m in enumerate(raw)]
        if any(not m["content"].strip() for m in messages):
            raise APIError(400, "a message has empty content", "messages")
        for i, m in enumerate(messages):
            if m["role"] == "system" and i > 0:
                raise APIError(400, "a system message may only come first, once", f"messages.{i}.role")
            # a line opening with a role tag would forge a turn of the cerbero format: refused
            if forges_turn(m["content"]):
                raise APIError(
                    400, f"a line of the content starts with a role tag {ROLE_TAGS}", f"messages.{i}.content"
                )
        if messages[-1]["role"] == "system":
            raise APIError(400, "the last message must be the user's (or the assistant's, to continue it)", "messages")
        try:
            return await asyncio.to_thread(self.engine.render_chat, messages)
        except Exception as e:  # whatever the template refuses is the request's fault
            raise APIError(400, f"the messages cannot be rendered: {e}", "messages") from None

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request, req: ChatRequest):
        return await self._complete(request, req, await self._render(req.messages), "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request, req: CompletionRequest):
        return await self._complete(request, req, req.prompt, "text")

    @app.post("/tokenize")
    async def tokenize(self, request: Request, req: TokenizeRequest):
        """A prompt's or a chat's tokens as a completion request would count them (vLLM's route and
        fields), with this server's limits: a client checks a long input before it sends it."""
        self._auth(request)
        self._adapter(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give prompt or messages (one of them)", "prompt")
        prompt = req.prompt if req.messages is None else await self._render(req.messages)
        ids = await asyncio.to_thread(self.engine.encode, prompt)
        sc = self.sc
        return {
            "count": len(ids),
            "tokens": ids,
            "max_prompt_tokens": sc.max_prompt_tokens,
            "max_model_len": sc.max_prompt_tokens + sc.max_new_tokens,
        }

    @app.post("/detokenize")
    async def detokenize(self, request: Request, req: DetokenizeRequest):
        """Token ids as text (special tokens left out, as in an answer)."""
        self._auth(request)
        self._adapter(req.model)
        vocab = self.vocab
        bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"tokens[{bad}]: {req.tokens[bad]} is not a token id of this model (0..{vocab - 1})",
                f"tokens.{bad}",
            )
        return {"prompt": await asyncio.to_thread(self.engine.tok.decode, req.tokens, skip_special_tokens=True)}

    def _model_card(self, name: str) -> dict:
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "cerbero-ray"}
        if name != self.sc.model_name:  # a LoRA adapter on the base (vLLM's field names)
            card.update(root=self.sc.adapters[name], parent=self.sc.model_name)
        return card

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [self._model_card(m) for m in self._served()]}

    @app.get("/v1/models/{model_id}")
    async def model(self, request: Request, model_id: str):
        self._auth(request)
        self._adapter(model_id)
        return self._model_card(model_id)

    @app.post("/v1/label")
    async def label(self, request: Request, req: LabelRequest):
        self._auth(request)
        if isinstance(req.task, str):
            if req.task not in self.engine.scorers:
                known = sorted(self.engine.scorers)
                raise APIError(
                    400, f"unknown task {short(req.task)}; this server labels {known}, or one sent inline", "task"
                )
            key, task, name = req.task, None, req.task
        else:
            dup = duplicate_key(await request.body())  # the body as read (cached by the parse)
            if dup is not None:
                msg = f"the body repeats the key {short(dup)}: send each key once"
                raise APIError(400, msg, "task", "duplicate_key")
            key, task, per_text = await asyncio.to_thread(self._inline_task, req.task)
            name = task.name
        if len(req.texts) > self.sc.max_label_texts:
            raise APIError(400, f"{len(req.texts)} texts; at most {self.sc.max_label_texts} per request", "texts")
        if task is not None:  # what scoring costs: every text is scored with every label's answer
            cost = len(req.texts) * per_text
            if cost > self.sc.max_label_tokens:
                raise APIError(
                    400,
                    f"{len(req.texts)} texts x {per_text:,} tokens (the task's prompt and every "
                    f"label's answer) = {cost:,}; the limit is {self.sc.max_label_tokens:,} per request: send fewer "
                    "texts at a time, or shorter labels",
                    "texts",
                    "label_cost_exceeded",
                )
        for i, t in enumerate(req.texts):
            if not t.strip():
                raise APIError(400, f"texts[{i}] is empty", f"texts.{i}")
        index, model = self._adapter(req.model)
        t0 = time.perf_counter()
        results = await self._label_batch((key, req.texts, index, task))
        if isinstance(results, dict):  # this request's texts failed to score (no other request did)
            raise APIError(500, f"labeling failed: {results['error']}", "texts", "label_failed")
        for i, r in enumerate(results):
            if r.get("error"):
                raise APIError(400, r["error"], f"texts.{i}", "context_length_exceeded")
        self.metrics.labeled(model, name, len(req.texts), time.perf_counter() - t0)
        return {
            "task": name,
            "model": model,
            "results": [{"label": r["label"], "probs": r["probs"], "truncated": r["truncated"]} for r in results],
        }

    def _inline_task(self, spec) -> tuple[str, LabelTask, int]:
        """An inline task checked as a configured one is at start-up (the verbalizers, the prompt's
        length without the text and with every label's answer), its key (the same task always finds
        the same scorer) and those tokens per text (what each text costs)."""
        from cerbero_ray.config.label_task import task_from_dict
        from cerbero_ray.inference.label_prompts import continuations, prompt_text

        d = spec.model_dump()
        blob = json.dumps(d, sort_keys=True, ensure_ascii=False).encode()
        key = "inline:" + hashlib.sha256(blob).hexdigest()[:16]
        try:
            task = task_from_dict(d)
            if key in self._task_tokens:  # checked already: an evaluation sends it again and again
                self._task_tokens.move_to_end(key)
                return key, task, self._task_tokens[key]
            conts = continuations(task, self.engine.tok)
        except ValueError as e:
            raise APIError(400, str(e).replace("label.task", "task"), "task") from None
        n = len(self.engine.encode(prompt_text(task, "", self.engine.tok))) + sum(len(c) for c in conts.values())
        if n > self.sc.max_prompt_tokens:
            raise APIError(
                400,
                f"the task's prompt (instruction, examples) and every label's answer (each scored after every "
                f"text) have {n:,} tokens before any text; the limit is {self.sc.max_prompt_tokens:,}",
                "task",
                "context_length_exceeded",
            )
        self._task_tokens[key] = n
        while len(self._task_tokens) > 128:  # the inline tasks checked most recently
            self._task_tokens.popitem(last=False)
        return key, task, n

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD too
    async def health(self):
        return {"status": "ok"}

    @app.api_route("/ready", methods=["GET", "HEAD"])
    async def ready(self):
        return {"status": "ready", "model": self.sc.model_name}

    @app.get("/", response_class=HTMLResponse)
    async def page(self):
        with open(PAGE, encoding="utf-8") as f:
            return f.read().replace("__MODEL__", self.sc.model_name)


def deployment(sc: ServeConfig):
    """The bound application for a checked ``serve`` config section."""
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    return CerberoServer.options(
        name="cerbero",
        autoscaling_config=AutoscalingConfig(
            min_replicas=sc.min_replicas,
            max_replicas=sc.max_replicas,
            target_ongoing_requests=sc.target_ongoing_requests,
            upscale_delay_s=sc.upscale_delay_s,
            downscale_delay_s=sc.downscale_delay_s,
            metrics_interval_s=sc.metrics_interval_s,
            look_back_period_s=sc.look_back_period_s,
        ),
        max_ongoing_requests=sc.max_ongoing_requests,
        max_queued_requests=sc.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=sc.overload_status, retry_after_s=sc.retry_after_s),
        ray_actor_options={"num_cpus": sc.cpus_per_replica, "num_gpus": sc.gpus_per_replica},
        graceful_shutdown_timeout_s=sc.shutdown_grace_s,  # in-flight requests finish first
        graceful_shutdown_wait_loop_s=0.5,
        # one start per first replica: until one is up, Serve retries a failed start up to 3 times
        # a replica, loading the weights again to fail the same way (a setting that does not fit, a
        # checkpoint it cannot read); once one is up, a replica that dies is still started again
        max_constructor_retry_count=sc.min_replicas,
    ).bind(sc)


def build_app(args: dict):
    """App builder for ``serve run cerbero_ray.serve.app:build_app key=value …`` and Serve config
    files: each ``key=value`` is an override of ``conf/serve.yaml``'s ``serve.<key>``."""
    from cerbero_ray.checkpoints import check_inference
    from cerbero_ray.config import check, compose

    sc = check("serve", compose("serve", [f"serve.{k}={v}" for k, v in (args or {}).items()])).serve
    check_inference(sc.checkpoint, sc.engine, "serve")
    return deployment(sc)
