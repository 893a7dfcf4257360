"""llama.cpp (through llama-cpp-python), always in a child process.

llama.cpp is native code, and native code can die from a signal: SIGILL from CPU kernels the build
chose that this machine cannot run (llama.cpp's AMX kernels on CPUs whose kernel gates AMX per
thread; see ``deploy/llama_cpp.cmake``), SIGSEGV on a file it misreads. In our own process
such a crash would end the job, or the whole test suite, without a word. So every call into
llama.cpp's runtime — the quantizer, loading a file, a forward pass, generation — runs in a child
(``python -m cerbero_ray.llamacpp``): a crash there is a :class:`NativeCrash` naming the signal and
what to do, and the caller goes on.

    from cerbero_ray import llamacpp
    llamacpp.call("logits", path="m.gguf", ids=[1, 415, 2063])["logits"]   # numpy (positions, vocab)

The request goes to the child as JSON on stdin; the child writes its answer (JSON, and arrays as
``.npy``) into a temporary folder the parent reads back. The child's stderr is the parent's.
``CERBERO_LLAMACPP_FAULT=SIGILL`` (any signal name) makes the child kill itself with that signal
before it runs the operation: the drill the tests use to show that a crash is reported, not fatal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile

BUILD_FLAG = 'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DCMAKE_PROJECT_INCLUDE=$PWD/deploy/llama_cpp.cmake"'
REBUILD = (
    "rebuild llama-cpp-python for this CPU without AMX kernels (README, 'Native builds'): "
    f"pip cache remove llama_cpp_python; {BUILD_FLAG} pip install --force-reinstall --no-deps llama-cpp-python"
)
FAULT_ENV = "CERBERO_LLAMACPP_FAULT"


class NativeCrash(RuntimeError):
    """The child running llama.cpp died from a signal."""

    def __init__(self, op: str, signum: int, what: str = ""):
        self.op, self.signum = op, signum
        self.signal = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        hint = REBUILD if self.signal == "SIGILL" else "llama.cpp crashed; the file or the build may be at fault"
        super().__init__(f"llama.cpp died with {self.signal} in {op}{' on ' + what if what else ''}: {hint}")


def _named(op: str, what: str) -> str:
    """``llama.cpp <op> on <file>``: how an error of a call names it."""
    return f"llama.cpp {op}{' on ' + what if what else ''}"


def available() -> bool:
    """Whether llama-cpp-python is installed (imported here only to look: nothing of llama.cpp runs)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def call(op: str, timeout: float | None = None, **kwargs) -> dict:
    """Run ``op`` (a function of :data:`OPS`) with ``kwargs`` in a child process; returns its
    answer. ``NativeCrash`` if the child dies from a signal, ``RuntimeError`` if it fails otherwise
    (its Python error's message), ``subprocess.TimeoutExpired`` past ``timeout`` seconds."""
    import numpy as np

    if op not in OPS:
        raise ValueError(f"llama.cpp operation {op!r} is not one of {sorted(OPS)}")
    what = kwargs.get("path") or kwargs.get("src") or ""
    with tempfile.TemporaryDirectory(prefix="cerbero-llamacpp-") as tmp:
        req = json.dumps({"op": op, "kwargs": kwargs, "out": tmp})
        p = subprocess.run([sys.executable, "-m", "cerbero_ray.llamacpp"], input=req.encode(), timeout=timeout)
        if p.returncode < 0:
            raise NativeCrash(op, -p.returncode, what)
        answer = os.path.join(tmp, "answer.json")
        if not os.path.exists(answer):
            raise RuntimeError(f"{_named(op, what)}: the child exited {p.returncode}")
        with open(answer) as f:
            result = json.load(f)
        if "error" in result:
            raise RuntimeError(f"{_named(op, what)}: {result['error']}")
        for name in result.pop("arrays", []):
            result[name] = np.load(os.path.join(tmp, f"{name}.npy"))
        return result


class Session:
    """One child for many calls (evaluation: a batch of rows each): llama.cpp and the model stay
    loaded between them, instead of a process start and a model load per call. Requests and answers
    are JSON lines on the child's stdin and its own copy of stdout (native prints go to stderr). A
    child that dies is a :class:`NativeCrash` (or ``RuntimeError``) for that call; the next call
    starts a fresh one. Answers must be JSON (no arrays): ``generate_many``, ``score_many``,
    ``metadata``, ``tokenize``."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def call(self, op: str, **kwargs) -> dict:
        if op not in OPS:
            raise ValueError(f"llama.cpp operation {op!r} is not one of {sorted(OPS)}")
        what = kwargs.get("path") or ""
        if self.proc is None or self.proc.poll() is not None:
            cmd = [sys.executable, "-m", "cerbero_ray.llamacpp", "--session"]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            self.proc.stdin.write(json.dumps({"op": op, "kwargs": kwargs}).encode() + b"\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        except OSError:  # the child is gone (a broken pipe)
            answer = b""
        if not answer:
            rc, self.proc = self.proc.wait(), None
            if rc < 0:
                raise NativeCrash(op, -rc, what)
            raise RuntimeError(f"{_named(op, what)}: the child exited {rc}")
        result = json.loads(answer)
        if "error" in result:
            raise RuntimeError(f"{_named(op, what)}: {result['error']}")
        return result

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # the child's loop ends at the end of its input
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


# ── the child's side ─────────────────────────────────────────────────────────────────────────────

_LOADED: dict[tuple, object] = {}  # (path, logits_all) -> Llama: a session's models stay loaded


def _loaded(path: str, n_ctx: int, logits_all: bool = False):
    """A Llama for ``path`` with at least ``n_ctx`` positions, kept for the session's next calls (a
    larger context than the one held loads it again). What it holds is the length of its token
    array: llama-cpp-python sizes that (and its logits) by the ``n_ctx`` asked for, while
    ``n_ctx()`` answers llama.cpp's context, rounded up to 256 (asked 541, it says 768: a prompt of
    600 tokens then overflowed the arrays of a model kept for a shorter one)."""
    key = (path, logits_all)
    llm = _LOADED.get(key)
    if llm is None or len(llm.input_ids) < n_ctx:
        _LOADED.pop(key, None)
        llm = _LOADED[key] = _llama(path, n_ctx=max(n_ctx, 512), logits_all=logits_all)
    return llm


def _llama(path: str, n_ctx: int = 512, threads: int = 0, logits_all: bool = False, lora: str | None = None):
    from llama_cpp import Llama

    return Llama(
        model_path=path,
        lora_path=lora,  # a LoRA GGUF applied at load time (export's adapter file)
        n_ctx=n_ctx,
        logits_all=logits_all,
        verbose=False,
        seed=0,
        n_threads=threads or min(os.cpu_count() or 1, 8),
    )


def system_info() -> dict:
    """llama.cpp's build: the CPU features its kernels were compiled for."""
    import llama_cpp

    return {"info": llama_cpp.llama_print_system_info().decode()}


def tokenize(path: str, texts: list[str], add_bos: bool = False, special: bool = False) -> dict:
    llm = _llama(path)
    return {"tokens": [llm.tokenize(t.encode(), add_bos=add_bos, special=special) for t in texts]}


def logits(path: str, ids: list[int], threads: int = 0) -> dict:
    """The logits at every position of ``ids`` (one forward pass)."""
    import numpy as np

    llm = _llama(path, n_ctx=max(64, len(ids) + 8), threads=threads, logits_all=True)
    llm.eval(ids)
    return {"logits": np.asarray(llm.scores[: len(ids)], dtype=np.float32)}


def check(path: str, prompt: str, threads: int = 0, lora: str | None = None) -> dict:
    """Load ``path`` (with the LoRA GGUF ``lora`` applied), tokenize ``prompt`` (with BOS, tags as
    text) and run one forward pass: the tokens and every position's logits."""
    import numpy as np

    llm = _llama(path, n_ctx=512, threads=threads, logits_all=True, lora=lora)
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
    llm.eval(ids)
    return {"tokens": ids, "logits": np.asarray(llm.scores[: len(ids)], dtype=np.float32)}


def generate(path: str, ids: list[int], max_tokens: int, threads: int = 0) -> dict:
    """Greedy continuation of ``ids``, at most ``max_tokens`` tokens, stopping after EOS."""
    llm = _llama(path, threads=threads)
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(t)
        if len(out) == max_tokens or t == llm.token_eos():
            break
    return {"tokens": out}


def choice_grammar(choices: list[str]) -> str:
    """A GBNF grammar whose only sentences are ``choices`` (llama.cpp's constrained decoding)."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("a choice list must hold at least one non-empty string")
    # one space allowed first, as our llguidance grammars allow it (cerbero_ray.config.constraint)
    return 'root ::= " "? (' + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices) + ")"


def generate_many(
    path: str,
    prompts: list[list[int]],
    max_tokens: int,
    stop: list[str],
    threads: int = 0,
    grammar: str | None = None,
    slots: int = 1,
) -> dict:
    """Greedy continuations of many token-id prompts, one model load: each stops at EOS, at one of
    the ``stop`` strings (in its detokenized text) or after ``max_tokens`` tokens; ``grammar`` (GBNF,
    :func:`choice_grammar`): each held to it, and ended where it allows nothing more. ``slots`` > 1
    (without a grammar): up to that many prompts decoded together (:func:`_generate_batched`)."""
    from llama_cpp import LlamaGrammar

    longest = max((len(p) for p in prompts), default=1)
    llm = _loaded(path, longest + max_tokens + 8) if not threads else _llama(path, longest + max_tokens + 8, threads)
    if slots > 1 and grammar is None and len(prompts) > 1 and _can_batch():
        got = _generate_batched(llm, prompts, max_tokens, stop, slots)
        if got is not None:
            return {"tokens": got}
    out = []
    for ids in prompts:
        toks = []
        g = LlamaGrammar.from_string(grammar, verbose=False) if grammar else None  # a fresh state per prompt
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True, grammar=g):
            if t == llm.token_eos():
                break
            toks.append(t)
            if _ended(llm, toks, max_tokens, stop):
                break
        out.append(toks)
    return {"tokens": out}


def _ended(llm, toks: list[int], max_tokens: int, stop: list[str]) -> bool:
    text = llm.detokenize(toks).decode("utf-8", errors="ignore")
    return len(toks) >= max_tokens or any(s in text for s in stop)


def _can_batch() -> bool:
    """Whether this llama-cpp-python binds what :func:`_generate_batched` calls (llama.cpp's memory
    API and a context's KV streams: 2025's llama.cpp); older builds decode one prompt at a time."""
    import llama_cpp

    names = ("llama_memory_seq_rm", "llama_memory_seq_cp", "llama_get_memory", "llama_init_from_model")
    fields = {f for f, _ in llama_cpp.llama_context_params._fields_}
    return all(hasattr(llama_cpp, n) for n in names) and {"n_seq_max", "kv_unified"} <= fields


def _generate_batched(
    llm, prompts: list[list[int]], max_tokens: int, stop: list[str], slots: int
) -> list[list[int]] | None:
    """:func:`generate_many`'s greedy continuations, up to ``slots`` prompts at a time in one batch
    per step (continuous batching: a finished row's slot takes the next prompt), on a context of
    its own with one KV sequence per slot. llama.cpp reads the weights once per step for all of
    them: where one row's step is bound by reading the weights (a 7B on a many-core CPU), a step of
    8 costs little more than a step of 1; on 2 cores its Q4_K kernels are bound by arithmetic and
    the gain is smaller (docs/BENCHMARKS.md). A prompt runs only past the longest prefix that some
    slot's sequence holds (an EVALITA unit's few-shot examples), copied from that slot
    (``llama_memory_seq_cp``). Each step's tokens: the slots' next tokens first, then prompt tokens
    up to the batch size; a prompt whose
    prefix another slot is still running waits for it. The tokens are the one-at-a-time path's, but
    for near-ties: a batch of other rows rounds differently (as llama.cpp's own paths do: a whole
    prompt's forward and one token at a time differ by as much). None when llama.cpp cannot make
    the context (memory), or when fewer than 2 slots' KV caches fit in half the free memory
    (:func:`_fit_slots`): the caller decodes one prompt at a time."""
    import llama_cpp
    import numpy as np

    n_vocab, eos = llm.n_vocab(), llm.token_eos()
    longest = max(len(p) for p in prompts)
    per = -(-(longest + max_tokens + 1) // 256) * 256  # a slot's cells: a whole number of 256-cell blocks
    asked = min(slots, len(prompts), llama_cpp.llama_max_parallel_sequences())
    from cerbero_ray.cluster import host_free_memory

    slots = _fit_slots(asked, per, _kv_bytes_per_cell(llm.metadata), host_free_memory())
    if slots < asked:
        print(
            f"[llamacpp] {asked} slots of {per} positions would fill over half the free memory: {slots}",
            file=sys.stderr,
        )
    if slots < 2:
        return None
    params = type(llm.context_params).from_buffer_copy(llm.context_params)
    # each slot a KV stream of its own: attention reads a row's own cells (one shared stream of
    # cells for all slots makes every row's attention read every slot's: 2x slower at 16 slots)
    params.n_seq_max, params.kv_unified = slots, False
    params.n_ctx = slots * per
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:  # no memory for every slot's cells: one prompt at a time, in the model's own context
        print(f"[llamacpp] no context of {params.n_ctx} positions for {slots} slots: one at a time", file=sys.stderr)
        return None
    nb = params.n_batch
    batch = llama_cpp.llama_batch_init(nb, 0, 1)
    try:
        mem = llama_cpp.llama_get_memory(ctx)
        queue = [i for i in range(len(prompts)) if prompts[i]][::-1]  # popped from the end: in order
        out: list[list[int]] = [[] for _ in prompts]
        held: list[list[int]] = [[] for _ in range(slots)]  # the tokens in each slot's sequence
        feed: list[list[int]] = [[] for _ in range(slots)]  # what each slot runs next
        row: list[int | None] = [None] * slots
        while queue or any(r is not None for r in row):
            for s in range(slots):
                if row[s] is None and queue:
                    ids = prompts[queue[-1]]
                    src, n = max(((t, _shared(held[t], ids)) for t in range(slots)), key=lambda x: (x[1], x[0] == s))
                    coming = max((_shared(held[t] + feed[t], ids) for t in range(slots) if len(feed[t]) > 1), default=0)
                    if coming > n + 32:  # a slot is still running the prefix this prompt shares: wait for it
                        break
                    i = queue.pop()
                    if src == s:
                        llama_cpp.llama_memory_seq_rm(mem, s, n, -1)
                    else:
                        llama_cpp.llama_memory_seq_rm(mem, s, -1, -1)
                        if n:  # slots keep their own cells: a sequence is copied whole, then cut
                            llama_cpp.llama_memory_seq_cp(mem, src, s, -1, -1)
                            llama_cpp.llama_memory_seq_rm(mem, s, n, -1)
                    held[s], feed[s], row[s] = ids[:n], ids[n:], i
            order = sorted((s for s in range(slots) if row[s] is not None), key=lambda s: len(feed[s]) > 1)
            ends, n = [], 0
            for s in order:  # the decoding slots first, then prompts: as much as the batch holds
                take = min(len(feed[s]), nb - n)
                if take <= 0:
                    break
                for j, tok in enumerate(feed[s][:take]):
                    batch.token[n + j], batch.pos[n + j] = tok, len(held[s]) + j
                    batch.seq_id[n + j][0], batch.n_seq_id[n + j], batch.logits[n + j] = s, 1, 0
                held[s] += feed[s][:take]
                feed[s] = feed[s][take:]
                n += take
                if not feed[s]:  # its last token ran: the next one comes from its logits
                    batch.logits[n - 1] = 1
                    ends.append((s, n - 1))
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} ({n} tokens, {slots} slots, n_ctx {params.n_ctx})")
            for s, k in ends:
                i = row[s]
                t = int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, k), shape=(n_vocab,)).argmax())
                if t != eos:
                    out[i].append(t)
                if t == eos or _ended(llm, out[i], max_tokens, stop):
                    row[s] = None
                else:
                    feed[s] = [t]
        return out
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def _kv_bytes_per_cell(meta: dict) -> int:
    """The bytes of one position's keys and values in every layer, in llama.cpp's default f16
    cache (a Mistral-7B: 2 x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB); 0 if unknown."""
    try:
        heads = int(meta["llama.attention.head_count"])
        dim = int(meta.get("llama.attention.key_length") or int(meta["llama.embedding_length"]) // heads)
        kv = int(meta.get("llama.attention.head_count_kv") or heads)
        return 2 * int(meta["llama.block_count"]) * kv * dim * 2
    except (KeyError, ValueError, ZeroDivisionError):
        return 0


def _fit_slots(slots: int, cells: int, cell_bytes: int, available: int | None) -> int:
    """As many of ``slots`` as keep their KV cache (``cells`` each of ``cell_bytes``) within half
    the memory ``available``, at least 1; all of them when either is unknown. A 7B's 16 slots of
    2,048 positions (SQuAD-it's prompts) are 4 GiB."""
    if not cell_bytes or not available:
        return slots
    return max(1, min(slots, available // 2 // (cells * cell_bytes)))


def score_many(path: str, prompts: list[list[int]], continuations: dict[str, list[int]], threads: int = 0) -> dict:
    """The summed log-probability of each continuation after each prompt: the prompt's forward pass
    once, then each continuation after it (the KV cache rewound to the prompt's end); the
    log-softmax only at the positions that predict a continuation token. One model load. A prompt
    runs only past what it shares with the tokens the cache holds (the previous prompt's: the same
    few-shot examples, as llama-cpp-python's ``generate`` reuses a prefix), its last token always;
    ``prompt_tokens``: how many prompt tokens it evaluated."""
    import numpy as np

    longest = max((len(p) for p in prompts), default=1) + max((len(c) for c in continuations.values()), default=1)
    llm = _loaded(path, longest + 8, logits_all=True) if not threads else _llama(path, longest + 8, threads, True)
    out, evaluated = [], 0
    for ids in prompts:
        llm.n_tokens = _shared(llm.input_ids[: llm.n_tokens], ids)  # eval drops the cache past it
        evaluated += len(ids) - llm.n_tokens
        llm.eval(ids[llm.n_tokens :])
        first = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)  # predicts every label's first token
        row = {}
        for label, cont in continuations.items():
            llm.n_tokens = len(ids)  # rewind: eval drops the cache past it and goes on from the prompt's end
            if len(cont) > 1:
                llm.eval(cont[:-1])
            rows = [first] + [np.asarray(llm.scores[len(ids) + j], dtype=np.float64) for j in range(len(cont) - 1)]
            logp = 0.0
            for x, t in zip(rows, cont):
                m = x.max()
                logp += float(x[t] - m - np.log(np.exp(x - m).sum()))
            row[label] = logp
        out.append(row)
    return {"logprobs": out, "prompt_tokens": evaluated}


def _shared(held, ids: list[int]) -> int:
    """How many of ``ids``' first tokens the cache holds (``held``, its tokens), at most all but the
    last: the prompt's last position must be evaluated for its logits. (The ground floor's own:
    :func:`cerbero_ray.inference.prefix.common_prefix` is a layer up.)"""
    import numpy as np

    n = min(len(held), len(ids) - 1)
    if n <= 0:
        return 0
    differ = np.flatnonzero(np.asarray(held[:n]) != np.asarray(ids[:n]))
    return int(differ[0]) if len(differ) else n


def metadata(path: str) -> dict:
    """The GGUF file's vocabulary size and chat template (llama.cpp's reading of its header)."""
    llm = _loaded(path, 64)
    return {"n_vocab": llm.n_vocab(), "chat_template": llm.metadata.get("tokenizer.chat_template")}


def complete(
    path: str, prompt: str, max_tokens: int, stop: list[str] | None = None, lora: str | None = None, **kw
) -> dict:
    """``Llama(path, lora_path=lora)(prompt, …)``, as a user's snippet calls it: the first choice."""
    llm = _llama(path, lora=lora)
    return llm(prompt, max_tokens=max_tokens, stop=stop or [], **kw)["choices"][0]


_FALLBACK = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
_FALLBACK_TENSOR = re.compile(r"not divisible by \d+ \(required for type")
_KEEP = []  # the log callback handed to C must outlive the call


def _quiet_log(llama_cpp, notes: list) -> list:
    """llama.cpp's log: warnings and errors to stderr, not its per-tensor progress. Its per-tensor
    fallback warnings (a row length that is not a multiple of the K-quant block, so the tensor gets a
    simpler type) and their total go to ``notes``: the caller reports them in one line."""
    import ctypes

    pending = [""]  # llama.cpp writes a line in pieces (GGML_LOG_LEVEL_CONT continues the last one)

    @llama_cpp.llama_log_callback
    def log(level, text, _user):
        if level not in (3, 4, 5) or (level == 5 and not pending[0]):  # WARN, ERROR, CONT of a kept line
            return
        pending[0] += text.decode("utf-8", errors="replace")
        *lines, pending[0] = pending[0].split("\n")
        for line in lines:
            if _FALLBACK_TENSOR.search(line) or _FALLBACK.search(line):
                notes.append(line)
            else:
                sys.stderr.write(line + "\n")

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    _KEEP[:] = [log]
    return pending


def quantize(src: str, dest: str, ftype: str, threads: int = 0) -> dict:
    """llama.cpp's quantizer (``llama_model_quantize``): ``src`` → ``dest`` as ``ftype`` (a
    ``LLAMA_FTYPE_*`` name). Returns the counts of tensors that kept a simpler type, if any."""
    import llama_cpp

    notes: list[str] = []
    pending = _quiet_log(llama_cpp, notes)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = threads
    try:
        rc = llama_cpp.llama_model_quantize(src.encode(), dest.encode(), params)
    finally:
        if pending[0]:  # a last warning without its newline
            sys.stderr.write(pending[0] + "\n")
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed with status {rc}")
    info = {}
    total = [m for m in map(_FALLBACK.search, notes) if m]
    if total:  # e.g. a tiny test model, whose 64-wide rows are no multiple of the 256-wide K-quant block
        info["fallback_tensors"], info["tensors"] = int(total[-1].group(1)), int(total[-1].group(2))
    elif any(_FALLBACK_TENSOR.search(n) for n in notes):
        info["fallback_tensors"] = sum(1 for n in notes if _FALLBACK_TENSOR.search(n))
    return info


OPS = {
    f.__name__: f
    for f in (system_info, tokenize, logits, check, generate, generate_many, score_many, metadata, complete, quantize)
}


def _child() -> None:
    import numpy as np

    req = json.loads(sys.stdin.buffer.read())
    fault = os.environ.get(FAULT_ENV)
    if fault:  # the drill: die as a native crash would
        os.kill(os.getpid(), getattr(signal, fault))
    out = req["out"]
    try:
        result = OPS[req["op"]](**req["kwargs"])
    except Exception as e:  # reported to the parent, which raises it with the operation named
        result = {"error": f"{type(e).__name__}: {e}"}
    arrays = [k for k, v in result.items() if isinstance(v, np.ndarray)]
    for k in arrays:
        np.save(os.path.join(out, f"{k}.npy"), result.pop(k))
    with open(os.path.join(out, "answer.json"), "w") as f:
        json.dump({**result, "arrays": arrays}, f)


def _session() -> None:
    """``--session``: requests as JSON lines on stdin until it closes, each answer a JSON line on
    this process's original stdout; fd 1 itself goes to stderr, so that nothing native writes there
    can corrupt an answer."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    fault = os.environ.get(FAULT_ENV)
    for line in sys.stdin:
        if fault:  # the drill: die as a native crash would
            os.kill(os.getpid(), getattr(signal, fault))
        req = json.loads(line)
        try:
            result = OPS[req["op"]](**req["kwargs"])
            text = json.dumps(result)
        except Exception as e:  # reported to the parent, which raises it with the operation named
            text = json.dumps({"error": f"{type(e).__name__}: {e}"})
        answers.write(text + "\n")
        answers.flush()


if __name__ == "__main__":
    _session() if "--session" in sys.argv else _child()
