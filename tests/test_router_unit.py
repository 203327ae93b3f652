"""The router's background loading of vLLM's request fields (pure: no Ray, no engine)."""

from __future__ import annotations

import os
import threading

import pytest

from deployments.router import in_background_at_lowest_priority, load_request_fields


def test_background_load_runs_at_the_lowest_priority_off_the_caller_thread():
    caller = threading.get_native_id()
    caller_niceness = os.getpriority(os.PRIO_PROCESS, caller)

    def load() -> tuple[int, int]:
        return threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread_id, niceness = in_background_at_lowest_priority(load, "test-load").result(timeout=10)
    assert thread_id != caller
    assert niceness == 19
    # The caller's own priority is untouched.
    assert os.getpriority(os.PRIO_PROCESS, caller) == caller_niceness


def test_background_load_passes_its_error_to_the_waiter():
    def load() -> None:
        raise ImportError("no vllm here")

    with pytest.raises(ImportError, match="no vllm here"):
        in_background_at_lowest_priority(load, "test-load").result(timeout=10)


def test_request_fields_come_from_vllms_request_models():
    fields = load_request_fields()
    assert {"messages", "max_tokens", "temperature", "tools", "response_format"} <= fields.chat
    assert {"prompt", "max_tokens", "logprobs"} <= fields.completion
    assert "response_format" in fields.objects["/v1/chat/completions"]
    assert "messages" not in fields.objects["/v1/chat/completions"]  # a list, not an object
