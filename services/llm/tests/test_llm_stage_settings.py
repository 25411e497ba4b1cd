"""LLM_* variables reach the llm model only through its config.pbtxt parameters: the launcher reads them once
(cosyvoice_common.stage_params), fills the template, and the model's typed config holds them (its start-up
line prints the engine config it built); the model itself reads no environment."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cosyvoice_common.stage_params import stage_params
from cosyvoice_launcher.stack import Stack
from cosyvoice_tools.testing import make_stack_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_llm_variables_become_the_engine_config(tiny_model_dir, tmp_path):
    params = stage_params("llm", {"LLM_BATCH_SLOTS": "3", "LLM_OVERLAP_HOST": "0", "LLM_REPETITION": "off",
                                  "LLM_MAX_SEQ_LEN": "512", "LLM_MAX_BATCH_SIZE": "4"})
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
    assert "max_batch_slots=3" in started and "max_seq_len=512" in started
    assert "overlap_host=False" in started and "RepetitionConfig(enabled=False" in started
    rendered = (tmp_path / "repos" / "llm-0" / "llm" / "config.pbtxt").read_text()
    assert 'key: "repetition" value: { string_value: "off" }' in rendered
