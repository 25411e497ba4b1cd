"""Flow: golden parity, state_dict layout (tiny and full size on meta), fixed noise, strict loading, config."""
import copy
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from cosyvoice_common.errors import CheckpointError
from cosyvoice_common.golden import golden_dir
from cosyvoice_token2wav import parity_flow
from cosyvoice_token2wav.flow import (
    CausalMaskedDiffWithXvec,
    FlowConfig,
    build_flow,
    cosine_t_schedule,
    fixed_noise,
    load_flow,
    load_flow_state,
)
from cosyvoice_token2wav.flow.config import NOISE_FRAMES, NOISE_SEED

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")   # 2 shared CI cores

_REPO = Path(__file__).resolve().parents[3]
# the shared folder sits beside the checkout here and inside it on the device machine
GOLDEN_DIR = golden_dir()





def _golden_file(name: str) -> Path:
    path = GOLDEN_DIR / name
    if not path.is_file():
        print(f"golden file not found: {path}")
        pytest.skip(f"golden file not found: {path}")
    return path


@pytest.fixture(scope="module")
def tiny_cfg() -> dict:
    return json.loads(_golden_file("config.json").read_text())["flow"]


@pytest.fixture(scope="module")
def full_cfg() -> dict:
    return json.loads(_golden_file("full_size_config.json").read_text())["flow"]


@pytest.fixture(scope="module")
def golden_state() -> dict:
    return torch.load(_golden_file("flow.pt"), map_location="cpu", weights_only=True)


def _shapes(module: torch.nn.Module) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in module.state_dict().items()]


# --- parity -------------------------------------------------------------------------------------------------

def test_every_golden_flow_case_and_intermediate_within_tolerance():
    _golden_file("flow.npz")
    results = parity_flow.cases(GOLDEN_DIR)
    names = {r.case for r in results}
    for case in ("offline", "stream_full_finalize", "stream_nofinal"):
        for part in ("mel", "decoder_out", "mu", "cond", "spks", "encoder_out", "encoder_proj_out"):
            assert f"flow.{case}.{part}" in names
    assert {"flow.offline.est0_out", "flow.stream_nofinal.est3_out", "flow.offline.est_t_all",
            "flow.rand_noise"} <= names
    failed = [(r.case, r.max_abs_err) for r in results if not r.passed]
    assert not failed, failed


def test_streaming_estimator_call_depends_on_chunk_mask(golden_state, tiny_cfg):
    """The est3 golden is a streaming call: full attention must NOT reproduce it (the mask is really applied)."""
    z = np.load(_golden_file("flow.npz"))
    flow = load_flow_state(build_flow(tiny_cfg), GOLDEN_DIR / "flow.pt", "cpu")
    args = [torch.from_numpy(z[f"stream_nofinal__est3_{n}"]) for n in ("x", "mask", "mu", "t", "spks", "cond")]
    with torch.inference_mode():
        chunked = flow.decoder.estimator(*args, streaming=True)
        full = flow.decoder.estimator(*args, streaming=False)
    want = z["stream_nofinal__est3_out"]
    assert np.abs(chunked.numpy() - want).max() < parity_flow.FLOW_ATOL
    assert np.abs(full.numpy() - want).max() > 100 * parity_flow.FLOW_ATOL


# --- fixed noise and t schedule -----------------------------------------------------------------------------

def test_regenerated_noise_equals_stored_reference_buffer_exactly():
    want = np.load(_golden_file("rand_noise.npy"))
    got = fixed_noise(want.shape[1], NOISE_FRAMES, NOISE_SEED)
    assert got.shape == want.shape == (1, 80, NOISE_FRAMES)
    assert np.array_equal(got.numpy(), want)


def test_noise_is_a_non_persistent_buffer_and_global_rng_untouched(tiny_cfg):
    torch.manual_seed(123)
    before = torch.rand(4)
    torch.manual_seed(123)
    flow = CausalMaskedDiffWithXvec.from_config(tiny_cfg)
    assert "decoder.rand_noise" in dict(flow.named_buffers())
    assert not any("rand_noise" in k for k in flow.state_dict())
    # building the flow here does not reseed the global RNG, unlike the reference
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), before)


def test_cosine_schedule_starts_at_zero_and_steps_sum_to_one():
    t, dt = cosine_t_schedule(10)
    assert t.shape == dt.shape == (10,)
    assert t[0].item() == 0.0
    assert torch.all(dt > 0)
    assert abs((t[-1] + dt[-1]).item() - 1.0) < 1e-6
    assert torch.all(dt[1:] > dt[:-1])   # cosine: small steps near noise, growing toward data


# --- state_dict layout ----------------------------------------------------------------------------------------

def test_tiny_flow_keys_and_shapes_match_reference_in_order(tiny_cfg):
    want = json.loads(_golden_file("tiny_keys.json").read_text())["flow.pt"]
    assert _shapes(build_flow(tiny_cfg)) == list(want.items())


def test_full_size_flow_on_meta_matches_reference_keys_and_shapes(full_cfg):
    want = json.loads(_golden_file("full_size_keys.json").read_text())["flow.pt"]
    flow = build_flow(full_cfg)
    assert all(p.is_meta for p in flow.parameters())
    assert _shapes(flow) == list(want.items())


def test_yaml_without_hard_coded_sizes_defaults_to_reference_values(full_cfg):
    """A parsed cosyvoice2.yaml has no __not_in_yaml__: 512-wide pre-lookahead/up layers, stride 2, 4 up blocks."""
    cfg = copy.deepcopy(full_cfg)
    del cfg["encoder"]["__not_in_yaml__"]
    parsed = FlowConfig.from_dict(cfg)
    assert parsed.encoder.pre_lookahead_channels == 512 and parsed.encoder.up_channels == 512
    assert parsed.encoder.up_stride == 2 and parsed.encoder.num_up_blocks == 4
    want = json.loads(_golden_file("full_size_keys.json").read_text())["flow.pt"]
    assert _shapes(build_flow(cfg)) == list(want.items())


def test_config_rejects_unsupported_structure(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg["decoder"]["estimator"]["channels"] = [64, 64]
    with pytest.raises(ValueError, match="one-level"):
        FlowConfig.from_dict(cfg)
    cfg = copy.deepcopy(tiny_cfg)
    cfg["encoder"]["use_cnn_module"] = True
    with pytest.raises(ValueError, match="cnn"):
        FlowConfig.from_dict(cfg)


# --- strict loading -------------------------------------------------------------------------------------------

def test_loader_names_missing_and_unexpected_keys(tmp_path, tiny_cfg, golden_state):
    state = dict(golden_state)
    del state["encoder.up_layer.conv.bias"]
    state["decoder.estimator.bogus.weight"] = torch.zeros(3)
    path = tmp_path / "flow.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_flow_state(build_flow(tiny_cfg), path, "cpu")
    assert "encoder.up_layer.conv.bias" in str(err.value)
    assert "decoder.estimator.bogus.weight" in str(err.value)


def test_loader_names_shape_mismatch(tmp_path, tiny_cfg, golden_state):
    state = dict(golden_state)
    state["encoder_proj.bias"] = torch.zeros(81)
    path = tmp_path / "flow.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="encoder_proj.bias"):
        load_flow_state(build_flow(tiny_cfg), path, "cpu")


def test_load_flow_reads_model_dir_with_its_config(tmp_path, monkeypatch, tiny_cfg, golden_state):
    torch.save(golden_state, tmp_path / "flow.pt")
    seen = []
    fake = types.ModuleType("cosyvoice_common.modelconfig")

    def load_model_config(model_dir):
        seen.append(Path(model_dir))
        return {"flow": tiny_cfg}

    fake.load_model_config = load_model_config
    monkeypatch.setitem(sys.modules, "cosyvoice_common.modelconfig", fake)
    flow = load_flow(tmp_path, "cpu")
    assert seen == [tmp_path]
    assert not flow.training
    assert all(not p.is_meta and p.dtype == torch.float32 for p in flow.parameters())
    assert torch.equal(flow.encoder_proj.weight, golden_state["encoder_proj.weight"])
    assert flow.decoder.rand_noise.shape == (1, 80, NOISE_FRAMES)
