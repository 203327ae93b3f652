"""TENSOR_PARALLEL_SIZE=2 on CPU (two CPU bundles, vLLM's mp executor with one core per rank) and a
CUSTOM_CHAT_TEMPLATE, in one app: greedy output equals TP=1's, and the template is what the engine sees."""

from __future__ import annotations

import pytest
import ray

from tests.faults import replica_actor_name, replica_ids

TEMPLATE = "{% for m in messages %}<|system|>{{ m['content'] }} robots robots{% endfor %}<|assistant|>"


@pytest.fixture(scope="module")
def tp2_app(apps, tiny_model):
    running = apps.start("tp2", {
        "MODEL_NAME": str(tiny_model),
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "tiny",
        "MAX_MODEL_LEN": 512,
        "TENSOR_PARALLEL_SIZE": 2,
        "CUSTOM_CHAT_TEMPLATE": TEMPLATE,
    })
    yield running
    apps.stop("tp2")


def test_engine_placement_group_has_two_cpu_bundles(tp2_app):
    [replica] = replica_ids("tp2")
    actor = ray.get_actor(replica_actor_name("tp2", replica), namespace="serve")
    bundles = ray.get(actor.__ray_call__.remote(
        lambda _self: ray.util.get_current_placement_group().bundle_specs))
    assert bundles == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_greedy_output_equals_tp1(tp2_app, tiny_app):
    for prompt in ("the quick brown fox", "robots write short stories"):
        texts = [app.client().completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text
                 for app in (tiny_app, tp2_app)]
        assert texts[0] == texts[1]


def test_custom_chat_template_is_the_prompt_the_engine_sees(tp2_app, tiny_app, tiny_tokenizer):
    messages = [{"role": "user", "content": "paris"}]
    custom = tp2_app.client().chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    default = tiny_app.client().chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    rendered = "<|system|>paris robots robots<|assistant|>"
    assert custom.usage.prompt_tokens == len(tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert custom.usage.prompt_tokens != default.usage.prompt_tokens
