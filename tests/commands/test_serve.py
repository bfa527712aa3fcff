"""llmctl serve: a live uvicorn server on 127.0.0.1, driven by the official ``openai`` client."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from llmctl.core.generate.engine import Request, generate
from llmctl.core.generate.run import encode_prompt, load_engine
from llmctl.core.generate.sampling import SamplingParams
from llmctl.core.serve.engine import ServeConfig
from llmctl.core.serve.server import create_server, start_in_thread

KEY = "test-key"
NAME = "tiny"


@pytest.fixture(scope="module")
def engine(tiny_model):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and the client threads need a core
    yield load_engine(str(tiny_model))
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(engine):
    config = ServeConfig(block_size=16, num_blocks=96, max_num_seqs=16, max_num_batched_tokens=96)
    s = start_in_thread(create_server(engine, config, port=0, model_name=NAME, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(url, body, *, key=KEY, raw=None):
    """(status, parsed JSON body) of a POST, without raising on HTTP errors."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _reference(engine, kind, value, **params):
    prompt = encode_prompt(engine, kind, value)
    return generate(engine, [Request(prompt, SamplingParams(**params))])


def _wait_idle(server, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.core.requests and server.core.allocator.num_used == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {server.core.stats()}")


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]


def test_completion_is_generates_greedy_text(client, engine):
    out = client.completions.create(model=NAME, prompt="Hello there", max_tokens=10, temperature=0)
    ref = _reference(engine, "text", "Hello there", max_tokens=10)[0]
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.prompt_tokens == ref.prompt_tokens


def test_chat_completion_applies_the_chat_template(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    ref = _reference(engine, "chat", messages, max_tokens=8)[0]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.object == "chat.completion"


def test_streamed_chunks_concatenate_to_the_non_streamed_text(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    kwargs = dict(
        model=NAME, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    stream = client.completions.create(model=NAME, prompt="abc", max_tokens=9, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in stream)
    assert (
        streamed
        == client.completions.create(model=NAME, prompt="abc", max_tokens=9, temperature=0).choices[0].text
    )


def test_stream_ends_with_done(server):
    body = {"prompt": "xy", "max_tokens": 3, "stream": True, "temperature": 0}
    req = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().splitlines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_n_samples_are_reproducible_with_a_seed(client, engine):
    kwargs = dict(
        model=NAME, prompt="Once", max_tokens=8, temperature=1.0, n=3, extra_body={"ignore_eos": True}
    )
    a = client.completions.create(**kwargs, seed=11)
    b = client.completions.create(**kwargs, seed=11)
    c = client.completions.create(**kwargs, seed=12)
    texts = [ch.text for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts == [ch.text for ch in b.choices]
    assert texts != [ch.text for ch in c.choices]
    assert len(set(texts)) > 1
    ref = _reference(engine, "text", "Once", max_tokens=8, temperature=1.0, n=3, seed=11, ignore_eos=True)
    assert texts == [r.text for r in ref]


@pytest.mark.parametrize("at", [0, 3])
def test_stop_string_cuts_the_completion(client, at):
    prompt = "The quick brown fox"
    kwargs = dict(model=NAME, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[at : at + 2]
    assert len(stop) == 2
    out = client.completions.create(**kwargs, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_logprobs_are_returned(client):
    out = client.completions.create(model=NAME, prompt="hi", max_tokens=4, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(d) == 2 for d in lp.top_logprobs)
    messages = [{"role": "user", "content": "hi"}]
    extra = {"ignore_eos": True}
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body=extra)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


def test_32_concurrent_greedy_requests_match_generate(client, engine, server):
    prompts = [f"Request number {i}: " + "x" * (i * 3) for i in range(32)]
    lengths = [1 + (i * 7) % 13 for i in range(32)]

    def one(i):
        out = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                        extra_body={"ignore_eos": True})  # fmt: skip
        return out.choices[0].text

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(one, range(32)))
    ref = [
        _reference(engine, "text", p, max_tokens=n, ignore_eos=True)[0].text
        for p, n in zip(prompts, lengths, strict=True)
    ]
    assert texts == ref
    _wait_idle(server)
    server.core.allocator.check()


def test_repeated_system_prompt_shows_prefix_cache_hits_in_metrics(client, server):
    def hits():
        text = _get(server.url + "/metrics")[1]
        return float(re.search(r'^llmctl:prefix_cache_hits_total\{model_name="tiny"\} (\S+)$', text, re.M)[1])

    system = "You are a helpful assistant. " * 6  # well over two 16-token blocks
    before = hits()
    for q in ("one", "two", "three"):
        client.chat.completions.create(model=NAME, max_tokens=2, temperature=0,
                                       messages=[{"role": "system", "content": system},
                                                 {"role": "user", "content": q}])  # fmt: skip
    assert hits() - before >= 2 * 16 * 2  # the 2nd and 3rd requests reuse at least two blocks each
    metrics = _get(server.url + "/metrics")[1]
    names = [
        "llmctl:time_to_first_token_seconds_bucket",
        "llmctl:e2e_request_latency_seconds_count",
        "llmctl:inter_token_latency_seconds_sum",
        "llmctl:num_requests_running",
        "llmctl:kv_cache_usage_perc",
        "llmctl:prompt_tokens_total",
        "llmctl:generation_tokens_total",
    ]
    assert all(name in metrics for name in names)


def test_tools_are_rendered_into_the_prompt_and_bad_tool_choice_is_400(client, server):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2, temperature=0)
    with_tools = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2, temperature=0,
                                                tools=[tool])  # fmt: skip
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tool description is in
    assert with_tools.choices[0].finish_reason in ("length", "stop", "tool_calls")
    body = {
        "messages": messages,
        "tools": [tool],
        "tool_choice": {"type": "function", "function": {"name": "x"}},
    }
    status, out = _post(server.url + "/v1/chat/completions", body)
    assert status == 400 and out["error"]["param"] == "tools"


def test_tokenize_and_detokenize_round_trip(server, engine):
    status, out = _post(server.url + "/tokenize", {"prompt": "héllo"})
    assert status == 200 and out["tokens"] == engine.tokenizer("héllo")["input_ids"]
    assert out["count"] == len(out["tokens"])
    status, back = _post(server.url + "/detokenize", {"tokens": out["tokens"]})
    assert status == 200 and "héllo" in back["prompt"]


@pytest.mark.parametrize(
    "body,raw,key,status",
    [
        (None, b"{not json", KEY, 400),
        (None, b"[1, 2]", KEY, 400),
        ({"prompt": "hi", "max_tokens": "many"}, None, KEY, 400),
        ({"prompt": 5}, None, KEY, 400),
        ({"prompt": "hi", "temperature": -1}, None, KEY, 400),
        ({"prompt": "hi", "model": "gpt-9"}, None, KEY, 404),
        ({"prompt": "hi"}, None, None, 401),
        ({"prompt": "hi"}, None, "wrong-key", 401),
        ({"prompt": "z" * 600}, None, KEY, 400),  # 600 byte tokens: over the 512-token context
        ({"prompt": [1, 2, 100000]}, None, KEY, 400),
    ],
    ids=[
        "bad-json",
        "not-an-object",
        "wrong-type",
        "prompt-type",
        "out-of-range",
        "unknown-model",
        "missing-key",
        "wrong-key",
        "too-long",
        "bad-token-id",
    ],  # fmt: skip
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, raw, key, status):
    got, out = _post(server.url + "/v1/completions", body, key=key, raw=raw)
    assert got == status
    assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["message"]
    assert _get(server.url + "/health")[0] == 200
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=1).choices[0].text is not None


def test_unknown_route_and_bad_chat_messages(server):
    assert _post(server.url + "/v1/nothing", {})[0] == 404
    assert _post(server.url + "/v1/chat/completions", {"messages": []})[0] == 400
    assert (
        _post(server.url + "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})[0]
        == 400
    )
    assert _post(server.url + "/detokenize", {"tokens": ["a"]})[0] == 400
    assert _post(server.url + "/tokenize", {"messages": [{"role": "x", "content": 1}]})[0] == 400
    assert _post(server.url + "/tokenize", {})[0] == 400


def test_openai_client_raises_typed_errors(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError):
        good.completions.create(model=NAME, prompt="x", top_p=3)


def test_client_disconnect_cancels_the_request(server, client):
    before = server.core.generation_tokens
    stream = client.completions.create(model=NAME, prompt="go", max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    for i, _chunk in enumerate(stream):
        if i == 2:
            break
    stream.close()
    _wait_idle(server)
    assert server.core.generation_tokens - before < 400


def test_full_queue_is_429_and_a_stopped_engine_is_503(engine):
    config = ServeConfig(block_size=16, num_blocks=32, max_waiting=2)
    s = start_in_thread(create_server(engine, config, port=0, model_name=NAME))
    try:
        status, out = _post(s.url + "/v1/completions", {"prompt": "hi", "n": 3}, key=None)
        assert status == 429 and out["error"]["code"] == "queue_full"
        assert _post(s.url + "/v1/completions", {"prompt": "hi", "n": 2, "max_tokens": 2}, key=None)[0] == 200
        s.state.async_engine.shutdown(timeout=5)
        assert _get(s.url + "/health")[0] == 503
        assert _post(s.url + "/v1/completions", {"prompt": "hi"}, key=None)[0] == 503
    finally:
        s.stop()


def test_cli_serves_on_a_free_port_and_exits_0_on_sigterm(tiny_model):
    """(With the model as its own --draft: the CLI's speculative path, its acceptance logged at exit.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "serve", str(tiny_model), "--port", "0", "--num-blocks", "32",
         "--served-model-name", "t", "--api-key", "k", "--draft", str(tiny_model), "--num-draft-tokens", "2"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        lines = []
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline().decode()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"listening on port (\d+)", line):
                port = int(m[1])
        assert port, "".join(lines)
        assert any(f"http://127.0.0.1:{port}/v1" in line and "'t'" in line for line in lines)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        out = c.completions.create(model="t", prompt="hi", max_tokens=6, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "draft tokens accepted" in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_response_format_json_schema_gives_valid_json_and_a_bad_schema_is_400(client):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "n": {"type": "boolean"}},
              "required": ["city", "n"], "additionalProperties": False}  # fmt: skip
    for response_format in (
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        {"type": "json_object"},
    ):
        reply = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Where?"}], max_tokens=60, temperature=1.0,
            seed=3, n=2, response_format=response_format,
        )  # fmt: skip
        for choice in reply.choices:
            if response_format["type"] == "json_schema":  # bounded: always completes
                assert choice.finish_reason == "stop"
                jsonschema.validate(json.loads(choice.message.content), schema)
            elif choice.finish_reason == "stop":  # any JSON may run past max_tokens, as in OpenAI's API
                json.loads(choice.message.content)
    with pytest.raises(openai.BadRequestError) as caught:
        bad = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "nonsense"}}}
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x"}], response_format=bad
        )
    assert "invalid json schema" in str(caught.value)


def _lp_tokens(chunks):
    """(tokens, token_logprobs) concatenated over streamed completion chunks."""
    tokens, values = [], []
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            tokens += c.choices[0].logprobs.tokens
            values += c.choices[0].logprobs.token_logprobs
    return tokens, values


def test_streamed_chunks_carry_the_logprobs_of_their_tokens(client):
    kwargs = dict(model=NAME, prompt="Hello", max_tokens=10, temperature=0, logprobs=2,
                  extra_body={"ignore_eos": True})  # fmt: skip
    full = client.completions.create(**kwargs).choices[0].logprobs
    chunks = list(client.completions.create(**kwargs, stream=True))
    tokens, values = _lp_tokens(chunks)
    assert tokens == full.tokens and values == pytest.approx(full.token_logprobs)
    tops = [
        d for c in chunks if c.choices and c.choices[0].logprobs for d in c.choices[0].logprobs.top_logprobs
    ]
    assert [list(d) for d in tops] == [list(d) for d in full.top_logprobs]
    offsets = [
        o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    assert offsets == full.text_offset
    messages = [{"role": "user", "content": "hi"}]
    chat_kwargs = dict(model=NAME, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                       top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.chat.completions.create(**chat_kwargs).choices[0].logprobs.content
    streamed = [
        entry
        for c in client.chat.completions.create(**chat_kwargs, stream=True)
        if c.choices and c.choices[0].logprobs
        for entry in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole])
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_echo_returns_the_prompt_with_its_logprobs(client, tiny_model, engine):
    from transformers import AutoModelForCausalLM

    prompt = "The cat sat"
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    ids = engine.tokenizer(prompt)["input_ids"]
    assert choice.text == prompt and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(d) == 1 for d in lp.top_logprobs[1:])
    # echo with generation, non-streamed and streamed: the prompt, then the completion
    kwargs = dict(
        model=NAME, prompt=prompt, max_tokens=5, temperature=0, echo=True, extra_body={"ignore_eos": True}
    )
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip
    assert client.completions.create(**kwargs).choices[0].text == prompt + plain
    chunks = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert chunks[0] == prompt and "".join(chunks) == prompt + plain
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=prompt, max_tokens=0)


def test_a_list_of_prompts_gives_choices_prompt_major(client):
    kwargs = dict(model=NAME, max_tokens=6, temperature=1.0, n=2, seed=5, extra_body={"ignore_eos": True})
    singles = [client.completions.create(prompt=p, **kwargs) for p in ("Once", "Twice upon")]
    both = client.completions.create(prompt=["Once", "Twice upon"], **kwargs)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [c.text for s in singles for c in s.choices]
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert both.usage.completion_tokens == 4 * 6
    texts = {}
    for c in client.completions.create(prompt=["Once", "Twice upon"], stream=True, **kwargs):
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert [texts[i] for i in range(4)] == [c.text for c in both.choices]
    ids = client.completions.create(prompt=[[72, 105], [79, 110, 99, 101]], **kwargs)  # lists of token ids
    assert len(ids.choices) == 4 and ids.usage.prompt_tokens == 6


@pytest.fixture(scope="module")
def draft_server(engine):
    config = ServeConfig(block_size=16, num_blocks=64, max_num_seqs=8, num_draft_tokens=3)
    s = start_in_thread(create_server(engine, config, port=0, model_name=NAME, draft=engine))
    yield s
    s.stop()


def test_a_draft_model_changes_no_greedy_token_and_its_acceptance_is_in_metrics(draft_server, client):
    spec = openai.OpenAI(base_url=draft_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    prompts = [f"Prompt {i}: " + "ab" * i for i in range(6)]
    kwargs = dict(model=NAME, max_tokens=12, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda p: spec.completions.create(prompt=p, **kwargs).choices[0], prompts))
    want = [client.completions.create(prompt=p, **kwargs).choices[0] for p in prompts]
    assert [c.text for c in got] == [c.text for c in want]
    assert [c.logprobs.token_logprobs for c in got] == [
        pytest.approx(c.logprobs.token_logprobs, abs=1e-4) for c in want
    ]
    streamed = "".join(
        c.choices[0].text for c in spec.completions.create(prompt=prompts[3], stream=True, **kwargs)
    )
    assert streamed == want[3].text
    metrics = _get(draft_server.url + "/metrics")[1]

    def value(name):
        return float(re.search(rf'^llmctl:{name}_total\{{model_name="tiny"\}} (\S+)$', metrics, re.M)[1])

    drafted, accepted = value("spec_decode_num_draft_tokens"), value("spec_decode_num_accepted_tokens")
    assert drafted > 0 and accepted == drafted  # the target as its own draft: all accepted
    _wait_idle(draft_server)


def test_cli_refuses_a_draft_with_another_vocabulary(cli, tiny_model, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<other>"])
    tokenizer.save_pretrained(other)
    result = cli("serve", tiny_model, "--draft", other, "--port", "0", "--num-blocks", "8")
    assert result.exit_code == 2
    assert "vocabulary" in result.stderr
    result = cli("serve", tiny_model, "--draft", tiny_model, "--prompt-lookup", "2", "--port", "0")
    assert result.exit_code == 2 and "--prompt-lookup" in result.stderr
