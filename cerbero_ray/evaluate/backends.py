"""Models that are not HF folders: a GGUF file (llama.cpp, in a child process) and an
OpenAI-compatible endpoint (ours, vLLM, llama.cpp's server). Each answers the same request rows
as :class:`~cerbero_ray.evaluate.worker.EvalWorker`, on the driver (no actor pool: the work is in
the child process or behind the endpoint).

- ``.gguf``: prompts are rendered and tokenized with the cerbero tokenizer (the file must carry the
  Mistral vocabulary, as our export writes it; its chat template says which assistant tag), then
  llama.cpp generates greedily (under a GBNF grammar for ``choice``) or scores each label's
  continuation: every protocol runs.
- ``http(s)://…/v1``: ``/v1/chat/completions`` at temperature 0 for the generating protocols
  (``choice`` sends ``guided_choice``, as vLLM and our server read it; an endpoint that refuses it
  answers 400 per row, counted as errors). The
  ``score`` protocol needs the log-probability of given answers, which the chat API does not
  return: on cerbero-ray's own server it goes through ``/v1/label`` with the unit's yes/no task
  sent inline (the same scorer as the HF path, on the served model or adapter); an endpoint
  without it (vLLM, llama.cpp's server, OpenAI) is asked once, and refuses ``score`` in one line
  (``unsupported`` in the results). A request the endpoint cannot take now (429, 502, 503, 504,
  a refused, dropped or timed-out connection) is sent again after a wait (its ``Retry-After`` where
  it gives one; :data:`RETRY_WAITS`); one that still fails stops the evaluation in one line naming
  the URL, as does an endpoint that cannot be reached or asked for its model. The first request
  that fails stops the others at once (those waiting to try again give up, those not sent are not
  sent), whatever its place among the rows.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Optional

from cerbero_ray.chat import STOP_STRING
from cerbero_ray.config.evaluate import EvaluateConfig


@dataclass(frozen=True)
class ModelRun:
    """How one model of an evaluation runs (what its actors, its llama.cpp child or its endpoint
    client read): the ``evaluate`` section's engine, pool and endpoint settings, the model's
    checkpoint, the longest answer any unit asks for and the score units' label tasks
    ({"<task>/<unit>": LabelTask keys})."""

    checkpoint: str
    dtype: str
    batch_size: int
    max_prompt_tokens: int
    prefill_tokens: int
    workers: Optional[int]
    gpus_per_worker: float
    cpus_per_worker: float
    endpoint_model: Optional[str]
    endpoint_key_env: str
    endpoint_concurrency: int
    max_new_tokens: int = 1
    tasks: dict = field(default_factory=dict)

    @classmethod
    def of(cls, ec: EvaluateConfig, checkpoint: str, max_new_tokens: int = 1, tasks: dict | None = None) -> ModelRun:
        keys = [f for f in cls.__dataclass_fields__ if f not in ("checkpoint", "max_new_tokens", "tasks")]
        return cls(checkpoint, **{k: getattr(ec, k) for k in keys}, max_new_tokens=max_new_tokens, tasks=tasks or {})


def model_kind(spec: str) -> str:
    """``endpoint`` (an http(s) URL), ``gguf`` (a .gguf file) or ``hf`` (a folder or URI)."""
    if spec.startswith(("http://", "https://")):
        return "endpoint"
    return "gguf" if spec.lower().endswith(".gguf") else "hf"


NO_SCORE = (
    "this endpoint has no /v1/label for a task sent inline (cerbero-ray's server has one), and the "
    "OpenAI API returns no log-probability of a given answer, which the score protocol needs; it runs "
    "generate and benchita"
)
LABEL_CHUNK = 16  # texts per /v1/label request (the server's serve.max_label_texts is 64 by default)


def probe(kind: str, spec: str, cfg: ModelRun) -> tuple[ModelRun, dict[str, str]]:
    """``cfg`` naming the model an endpoint serves, and the protocols a model of ``kind`` at
    ``spec`` cannot run, with why: an endpoint is asked once which model it serves (unless
    ``endpoint_model`` names it) and whether it scores; HF folders and GGUF files run every protocol."""
    if kind != "endpoint":
        return cfg, {}
    client = EndpointRunner(spec, cfg)
    return replace(cfg, endpoint_model=client.model), ({} if client.scores() else {"score": NO_SCORE})


def _stops(newline: bool) -> list[str]:
    return [STOP_STRING, *(["\n"] if newline else [])]


def _cut(text: str, stops: list[str]) -> str:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)] if hits else text).strip()


class GGUFRunner:
    def __init__(self, path: str, cfg: ModelRun):
        from cerbero_ray import llamacpp, storage
        from cerbero_ray.chat import assistant_tag_of
        from cerbero_ray.tokenizer import build_tokenizer

        if not llamacpp.available():
            raise ValueError(f"{path}: a GGUF model needs llama-cpp-python (pip install -e '.[gguf]')")
        # one llama.cpp child for the whole evaluation of this file: the model loads once
        self.session = llamacpp.Session()
        self.path, self.cfg, self.call = storage.local_file(path), cfg, self.session.call
        meta = self.call("metadata", path=self.path)
        self.tok = build_tokenizer(assistant_tag=assistant_tag_of(meta.get("chat_template")))
        if meta["n_vocab"] != len(self.tok):
            raise ValueError(
                f"{path}: {meta['n_vocab']} tokens in its vocabulary; the cerbero tokenizer has {len(self.tok)} "
                "(evaluate GGUF files of cerbero checkpoints, as jobs/export.py writes them)"
            )

    def close(self) -> None:
        self.session.close()

    def run(self, rows: list[dict]) -> list[dict]:
        from cerbero_ray import llamacpp
        from cerbero_ray.tokenizer import encode_prompts

        out = [None] * len(rows)
        gen = [i for i, r in enumerate(rows) if r["text"] is None]
        by = lambda r: (r["max_new_tokens"], r["stop_at_newline"], r.get("choices"))  # noqa: E731
        for (new, newline, choices), idx in _groups(rows, gen, by).items():
            prompts = [
                self.tok.apply_chat_template(rows[i]["messages"], tokenize=False, add_generation_prompt=True)
                for i in idx
            ]
            ids, cut = encode_prompts(self.tok, prompts, self.cfg.max_prompt_tokens)
            grammar = llamacpp.choice_grammar(json.loads(choices)) if choices else None
            toks = self.call(
                "generate_many",
                path=self.path,
                prompts=ids,
                max_tokens=new,
                stop=_stops(newline),
                grammar=grammar,
                slots=self.cfg.batch_size,
            )["tokens"]
            for i, t, c in zip(idx, toks, cut):
                out[i] = {
                    "raw": _cut(self.tok.decode(t, skip_special_tokens=True), _stops(newline)),
                    "p_yes": None,
                    "truncated": c,
                }
        scored = [i for i, r in enumerate(rows) if r["text"] is not None]
        for key, idx in _groups(rows, scored, lambda r: r.get("scorer") or f"{r['task']}/{r['unit']}").items():
            out_rows = self._score(key, [rows[i]["text"] for i in idx])
            for i, o in zip(idx, out_rows):
                out[i] = o
        return out

    def _score(self, key: str, texts: list[str]) -> list[dict]:
        import math

        from cerbero_ray.config.label_task import LabelTask
        from cerbero_ray.inference.label_prompts import continuations, prompt_text
        from cerbero_ray.tokenizer import encode_prompts

        task = LabelTask(**self.cfg.tasks[key])
        ids, cut = encode_prompts(self.tok, [prompt_text(task, t, self.tok) for t in texts], self.cfg.max_prompt_tokens)
        conts = continuations(task, self.tok)
        lps = self.call("score_many", path=self.path, prompts=ids, continuations=conts)["logprobs"]
        out = []
        for lp, c in zip(lps, cut):
            z = max(lp.values())
            p = {k: math.exp(v - z) for k, v in lp.items()}
            out.append({"raw": None, "p_yes": p["yes"] / sum(p.values()), "truncated": c})
        return out


# seconds before each new try of a request the endpoint could not take now (its Retry-After, up to
# a minute, where it gives one): 7 tries over about 30 s, then the evaluation stops in one line
RETRY_WAITS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
BUSY = {429, 502, 503, 504}  # overloaded or restarting: another try may pass


class EndpointError(ValueError):
    """What stops an endpoint's evaluation, in one line: a request it could not take on any of its
    tries, a key it refused, a server error."""


class _GaveUp(EndpointError):
    """A request not sent, or not tried again, because another failed first: never the one reported."""


def _busy(e: Exception) -> bool:
    """Whether another try of the request may pass: a 429 or 50x that says so, or a connection
    refused, dropped or timed out (a restarting server, a proxy between)."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code in BUSY
    return isinstance(e, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError))


def _wait(e: Exception, default: float) -> float:
    try:
        return min(max(float(e.headers["Retry-After"]), 0.0), 60.0)  # type: ignore[attr-defined]
    except (AttributeError, KeyError, TypeError, ValueError):
        return default


def _why(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"{e.code} {e.reason}"
    return str(getattr(e, "reason", None) or e) or type(e).__name__


class EndpointRunner:
    def __init__(self, url: str, cfg: ModelRun):
        self.url, self.cfg = url.rstrip("/"), cfg
        self._stop = threading.Event()  # set by run() at the first failure: the other requests give up
        self.key = os.environ.get(self._key_env(), "unused")
        self.model = cfg.endpoint_model or self._served_model()

    def _served_model(self) -> str:
        """The first model of ``/v1/models``; a clear error where the endpoint cannot say it."""
        try:
            listed = self._get("/models")
        except urllib.error.HTTPError as e:  # 404: no such route
            raise EndpointError(
                f"{self.url}/models: {_why(e)}; name the model it serves with evaluate.endpoint_model"
            ) from None
        try:
            return str(listed["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise EndpointError(
                f"{self.url}/models named no model (an OpenAI-compatible endpoint lists them under "
                "'data'); name it with evaluate.endpoint_model"
            ) from None

    def _request(self, path: str, body: dict | None = None) -> dict:
        """One request, sent again while the endpoint cannot take it now (:func:`_busy`); a refused
        key or a server error is an :class:`EndpointError`; another 4xx is raised as it came (the
        caller decides: a row over the endpoint's window, a route it lacks)."""
        req = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
        )
        for attempt, default in enumerate((*RETRY_WAITS, None)):
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    data = r.read()
                try:
                    return json.loads(data)
                except ValueError:
                    raise EndpointError(f"{self.url}{path}: answered {data[:80]!r}, not JSON") from None
            except Exception as e:  # what is not worth another try is raised as it came
                if isinstance(e, urllib.error.HTTPError) and e.code in (401, 403):
                    raise EndpointError(f"{self.url}: {_why(e)}; the key comes from ${self._key_env()}") from None
                if isinstance(e, urllib.error.HTTPError) and e.code >= 500 and e.code not in BUSY:
                    raise EndpointError(f"{self.url}{path}: {_why(e)}") from None
                if not _busy(e):
                    raise
                if default is None:
                    raise EndpointError(
                        f"{self.url}{path}: {_why(e)} on each of {attempt + 1} tries; is the endpoint up? "
                        "(the same command evaluates this model again)"
                    ) from None
                if self._stop.wait(_wait(e, default)):
                    raise _GaveUp(f"{self.url}{path}: not tried again: another request failed") from None

    def _get(self, path: str) -> dict:
        return self._request(path)

    def _answer(self, path: str, body: dict, read):
        """``read`` of the endpoint's answer to ``body``; an answer without what it reads is an
        :class:`EndpointError` naming the route (not an OpenAI-compatible answer)."""
        got = self._request(path, body)
        try:
            return read(got)
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.url}{path}: answered {json.dumps(got)[:120]}, not what it reads") from None

    def scores(self) -> bool:
        """Whether the endpoint scores given answers: cerbero-ray's ``/v1/label`` with a task inline."""
        probe = {"instruction": "Il testo è una prova?", "labels": {"yes": "Sì", "no": "No"}}
        try:
            body = self._request("/label", {"task": probe, "texts": ["prova"], "model": self.model})
            return set(body["results"][0]["probs"]) == {"yes", "no"}
        except EndpointError:  # down, a key refused: not a "no"
            raise
        except urllib.error.HTTPError:
            return False  # 404 (no such route), 400/422 (an older server: named tasks only)
        except (KeyError, IndexError, TypeError, ValueError):
            return False

    def _key_env(self) -> str:
        return self.cfg.endpoint_key_env or "OPENAI_API_KEY"

    def _score(self, key: str, texts: list[str]) -> list[dict]:
        """p(yes) of each text under the unit's task, from /v1/label; a text the server refuses
        (too long for its window) is ``p_yes`` None, counted as an error like the HF path's."""
        body = {"task": self.cfg.tasks[key], "texts": texts, "model": self.model}
        try:
            results = self._answer("/label", body, lambda b: b["results"])
        except urllib.error.HTTPError as e:
            if e.code != 400:
                raise EndpointError(f"{self.url}/label: {_why(e)}") from None
            if len(texts) == 1:
                return [_refused(e)]
            return [o for t in texts for o in self._score(key, [t])]  # one by one: the bad one alone
        return [{"raw": None, "p_yes": r["probs"]["yes"], "truncated": bool(r["truncated"])} for r in results]

    def run(self, rows: list[dict]) -> list[dict]:
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        out = [None] * len(rows)
        scored = [i for i, r in enumerate(rows) if r["text"] is not None]
        chunks = [
            (key, idx[s : s + LABEL_CHUNK])
            for key, idx in _groups(rows, scored, lambda r: r.get("scorer") or f"{r['task']}/{r['unit']}").items()
            for s in range(0, len(idx), LABEL_CHUNK)
        ]

        def one(i):
            r = rows[i]
            body = {
                "model": self.model,
                "messages": r["messages"],
                "max_tokens": r["max_new_tokens"],
                "temperature": 0,
                "stop": _stops(r["stop_at_newline"]),
            }
            if r.get("choices"):  # the choice protocol: vLLM's name, which our server accepts too
                body["guided_choice"] = json.loads(r["choices"])
            try:
                text = self._answer("/chat/completions", body, lambda b: b["choices"][0]["message"]["content"]) or ""
            except urllib.error.HTTPError as e:
                if e.code != 400:
                    raise EndpointError(f"{self.url}/chat/completions: {_why(e)}") from None
                return [i], [_refused(e)]  # this row only (a prompt over the endpoint's window): counted
            return [i], [{"raw": _cut(text, _stops(r["stop_at_newline"])), "p_yes": None, "truncated": False}]

        def chunk(c):
            key, idx = c
            return idx, self._score(key, [rows[i]["text"] for i in idx])

        def stopping(fn, item):
            """``fn(item)``, unless a request has failed: the first failure stops every other."""
            if self._stop.is_set():
                raise _GaveUp(f"{self.url}: not sent: another request failed")
            try:
                return fn(item)
            except BaseException:
                self._stop.set()
                raise

        self._stop.clear()
        with ThreadPoolExecutor(self.cfg.endpoint_concurrency) as pool:
            futures = [pool.submit(stopping, one, i) for i, r in enumerate(rows) if r["text"] is None]
            futures += [pool.submit(stopping, chunk, c) for c in chunks]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            failed = [f.exception() for f in futures if f in done and f.exception() is not None]
            if failed:  # the first in the rows' order among those failed by now, the cause of the rest
                raise next((e for e in failed if not isinstance(e, _GaveUp)), failed[0])
        for f in futures:
            for i, o in zip(*f.result()):
                out[i] = o
        return out


def _refused(e: urllib.error.HTTPError) -> dict:
    """A row the endpoint answered 400: no answer, its error kept and counted as one."""
    try:
        said = json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        said = e.reason
    return {"raw": None, "p_yes": None, "truncated": False, "error": f"{e.code}: {said}"[:300]}


def _groups(rows: list[dict], idx: list[int], key) -> dict:
    out: dict = {}
    for i in idx:
        out.setdefault(key(rows[i]), []).append(i)
    return out


def runner(kind: str, spec: str, cfg: ModelRun):
    return GGUFRunner(spec, cfg) if kind == "gguf" else EndpointRunner(spec, cfg)
