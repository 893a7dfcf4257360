"""The app on the other generation engine, ``serve.engine=hf`` (transformers ``generate`` behind
``@serve.batch``, streams through ``TextIteratorStreamer``): the official openai client's chat,
completion and streaming, as in test_serve.py (which runs the default, continuous engine)."""

import pytest
from test_serve import KEY, n_choices_roundtrip, openai_roundtrip, post

from cerbero_ray.config import compose, to_container
from conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hf_server(tiny_hf, ray_local):
    from ray import serve

    from cerbero_ray.serve.service import run_serve

    c = to_container(
        compose(
            "serve",
            [
                f"serve.checkpoint={tiny_hf}",
                f"serve.port={free_port()}",
                f"serve.api_key={KEY}",
                "serve.engine=hf",
                "serve.cpus_per_replica=0.5",
                "serve.max_prompt_tokens=256",
                "serve.max_new_tokens=64",
                "serve.default_max_tokens=16",
            ],
        )
    )
    url = run_serve(c)
    yield url
    serve.shutdown()


def test_openai_client_on_the_hf_engine(hf_server):
    openai_roundtrip(hf_server, models=("cerbero",), reuse=False)


def test_n_choices_on_the_hf_engine(hf_server):
    """``n`` choices on transformers' generate: each the answer of its own seed, as on the continuous
    engine; streaming several needs the continuous engine, a 400 naming ``n``."""
    n_choices_roundtrip(hf_server, stream=False, singles=True)
    body = {"messages": [{"role": "user", "content": "ciao"}], "n": 2, "stream": True}
    status, out, _ = post(f"{hf_server}/v1/chat/completions", body)
    assert status == 400 and out["error"]["param"] == "n" and "engine=continuous" in out["error"]["message"]


def test_penalties_and_a_logit_bias_stream_as_they_answer_on_the_hf_engine(hf_server):
    """A stream on the hf engine (transformers' streamer) runs under the same penalties and logit
    bias as the batched answer: the same text, which they changed."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{hf_server}/v1", api_key=KEY)
    kw = dict(model="cerbero", messages=[{"role": "user", "content": "Dimmi qualcosa."}], max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    kw |= dict(frequency_penalty=-2.0, presence_penalty=0.5, logit_bias={"1000": 5.0})
    kw |= dict(extra_body={"repetition_penalty": 1.3})  # vLLM's, beside OpenAI's
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert streamed.strip() == whole != plain
