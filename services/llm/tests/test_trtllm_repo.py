"""The tensorrtllm `llm` template against the stage contract (what the gateway sends), and its renderer."""
from __future__ import annotations

import re

import pytest

from cosyvoice_common.contracts import LLM_INPUTS, LLM_MODEL, LLM_OUTPUTS, LLM_STREAM_BOUNDARIES
from cosyvoice_llm.trtllm import repo

ENGINE_DIR = "/engines/cosyvoice2-bf16"
OUR_LLM_CONFIG = repo.SERVICE_ROOT / "model_repository" / LLM_MODEL / repo.CONFIG_NAME


def _by_name(tensors):
    return {t.name: t for t in tensors}


@pytest.fixture(scope="module")
def trtllm_config():
    return repo.parse_model_config(repo.render_config(repo.TrtllmRepoConfig(ENGINE_DIR).params()))


def _assert_serves_contract(config, specs):
    from tritonclient.grpc import model_config_pb2

    declared = _by_name(config)
    for spec in specs:
        assert spec.name in declared, f"{spec.name} missing"
        t = declared[spec.name]
        assert t.data_type == model_config_pb2.DataType.Value("TYPE_" + spec.datatype), spec.name
        assert tuple(t.dims) == spec.dims, spec.name
        if spec.optional:   # the gateway may omit it; a required one may still be optional in the model
            assert getattr(t, "optional", True), f"{spec.name} must be optional"


def test_template_serves_the_llm_contract(trtllm_config):
    assert trtllm_config.name == LLM_MODEL and trtllm_config.backend == "tensorrtllm"
    assert trtllm_config.model_transaction_policy.decoupled
    assert trtllm_config.max_batch_size > 0     # contract dims exclude the batch dimension
    _assert_serves_contract(trtllm_config.input, _theirs(LLM_INPUTS))
    _assert_serves_contract(trtllm_config.output, LLM_OUTPUTS)


def _theirs(specs):
    """The contract less our own optional `stream_boundaries`, which the stage client leaves out for a model that
    does not declare it (test_stage_client_leaves_out_inputs_the_model_does_not_declare)."""
    return tuple(s for s in specs if s.name != LLM_STREAM_BOUNDARIES.name)


def test_gateway_sends_only_contract_inputs(trtllm_config):
    from cosyvoice_gateway import stage_client
    sent = stage_client.stage_config("llm", "127.0.0.1:1", 1.0)
    assert sent.model == trtllm_config.name
    _assert_serves_contract(trtllm_config.input, _theirs(sent.inputs))


def test_stage_client_leaves_out_inputs_the_model_does_not_declare(trtllm_config):
    import asyncio

    import numpy as np

    from cosyvoice_gateway import stage_client

    async def build():
        client = stage_client.StageClient(stage_client.stage_config("llm", "127.0.0.1:1", 1.0), resolver=None)
        replica = client._replicas[0]
        tensors = {"input_ids": np.array([1, 2], np.int32), "input_lengths": np.array([2], np.int32),
                   LLM_STREAM_BOUNDARIES.name: np.array([18, 43], np.int32)}
        replica.inputs = frozenset(t.name for t in trtllm_config.input)        # TensorRT-LLM's declared inputs
        to_trtllm = [i.name() for i in client._inputs(tensors, True, replica)]
        replica.inputs = replica.inputs | {LLM_STREAM_BOUNDARIES.name}          # our llm stage declares it
        to_ours = [i.name() for i in client._inputs(tensors, True, replica)]
        await client.close()
        return to_trtllm, to_ours

    to_trtllm, to_ours = asyncio.run(build())
    assert to_trtllm == ["input_ids", "input_lengths"]
    assert to_ours == ["input_ids", "input_lengths", LLM_STREAM_BOUNDARIES.name]


def test_same_io_as_our_python_llm_model(trtllm_config):
    text = OUR_LLM_CONFIG.read_text()
    ours = repo.parse_model_config(re.sub(r"\$\{[A-Za-z_0-9]+\}", "0", text))
    theirs = _by_name(trtllm_config.input)
    for t in ours.input:
        if t.name == LLM_STREAM_BOUNDARIES.name:   # ours only: optional, sent only to a model that lists it
            assert t.optional and t.name not in theirs and tuple(t.dims) == LLM_STREAM_BOUNDARIES.dims
            continue
        assert t.name in theirs and theirs[t.name].data_type == t.data_type and theirs[t.name].dims == t.dims
        assert theirs[t.name].optional == t.optional, t.name
    theirs_out = _by_name(trtllm_config.output)
    for t in ours.output:
        assert theirs_out[t.name].data_type == t.data_type and theirs_out[t.name].dims == t.dims


def test_parameters(trtllm_config):
    params = {k: v.string_value for k, v in trtllm_config.parameters.items()}
    assert params["gpt_model_path"] == ENGINE_DIR
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["exclude_input_in_output"] == "true"
    assert params["max_tokens_in_paged_kv_cache"] == "2560" and params["kv_cache_free_gpu_mem_fraction"] == "0.5"
    assert params["enable_kv_cache_reuse"] == "false"
    assert not any("${" in v for v in params.values())


def test_unfilled_placeholder_is_an_error(tmp_path):
    params = repo.TrtllmRepoConfig(ENGINE_DIR).params()
    del params["gpu_device_ids"]
    with pytest.raises(repo.TemplateError, match=r"\$\{gpu_device_ids\}"):
        repo.render_config(params)
    with pytest.raises(repo.TemplateError):
        repo.fill_template("a ${b} c", {})


def test_render_repo_cli(tmp_path):
    out = tmp_path / "repo"
    assert repo.main(["--engine-dir", ENGINE_DIR, "--out", str(out), "--max-batch-size", "8"]) == 0
    model_dir = out / LLM_MODEL
    assert (model_dir / repo.VERSION_DIR).is_dir()
    config = repo.parse_model_config((model_dir / repo.CONFIG_NAME).read_text())
    assert config.max_batch_size == 8 and list(config.dynamic_batching.preferred_batch_size) == [8]
