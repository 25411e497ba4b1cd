"""LLM_* variables reach the llm model only through its config.pbtxt: the launcher reads them once into
LLMParams (cosyvoice_common.stage_params), fills the template, and the model reads the filled config back into an
equal LLMParams (its start-up line prints it); the model itself reads no environment."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cosyvoice_common.stage_params import stage_params
from cosyvoice_launcher.stack import Stack
from cosyvoice_tools.testing import make_stack_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_the_stage_reads_back_the_settings_the_launcher_read(tiny_model_dir, tmp_path):
    params = stage_params("llm", {"LLM_BATCH_SLOTS": "3", "LLM_PREFILL_GRAPHS": "0", "LLM_REPETITION": "off",
                                  "LLM_MAX_SEQ_LEN": "512", "LLM_MAX_BATCH_SIZE": "4",
                                  "LLM_MAX_QUEUE_DELAY_US": "250", "LLM_KV_CACHE_MEMORY_FRACTION": "0.3"})
    config = make_stack_config(tiny_model_dir, tmp_path, stages=("llm",))
    config = replace(config, stages=tuple(replace(s, params=params) if s.name == "llm" else s for s in config.stages))
    stack = Stack(config)
    stack.start()     # returns once the model is READY: initialize() has logged its engine config
    try:
        (record,) = stack.stage_records("llm")
        text = Path(record.log).read_text()
    finally:
        stack.stop()
    started = next(line for line in text.splitlines() if "engine started" in line)
    assert f"({params!r})" in started and "3 slots x 512 positions" in started
    rendered = (tmp_path / "repos" / "llm-0" / "llm" / "config.pbtxt").read_text()
    assert 'key: "repetition" value: { string_value: "off" }' in rendered
