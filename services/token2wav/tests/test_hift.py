"""HiFT vocoder: golden parity, checkpoint keys/shapes, strict loading, weight-norm folding, RNG isolation."""
import json

import pytest
import torch
from cosyvoice_common.errors import CheckpointError
from cosyvoice_common.golden import MISSING_HINT, golden_dir
from cosyvoice_token2wav.hift import (
    HiFTGenerator,
    SourceDraws,
    build_hift,
    load_hift_state,
)

# cosyvoice_common.golden finds the set (COSYVOICE_GOLDEN_DIR names another of the same format).
GOLDEN_DIR = golden_dir()
needs_golden = pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason=MISSING_HINT)


def _cfg(name: str = "config.json") -> dict:
    with open(GOLDEN_DIR / name) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def hift() -> HiFTGenerator:
    return build_hift(_cfg()["hift"], GOLDEN_DIR / "hift.pt", fold=True)


@pytest.fixture(scope="module")
def hift_results(hift):
    from cosyvoice_token2wav.parity import hift_cases
    return {r.case: r for r in hift_cases(GOLDEN_DIR, hift)}


HIFT_CASES = ["hift.f0", "hift.decode.speech", "hift.inference[injected].source", "hift.inference[injected].speech",
              "hift.inference[seeded].source", "hift.inference[seeded].speech"]


@needs_golden
@pytest.mark.parametrize("case", HIFT_CASES)
def test_hift_matches_golden(hift_results, case):
    r = hift_results[case]
    print(f"{case}: max_abs_err={r.max_abs_err:.3g} tol={r.tolerance}")
    assert r.passed, r


@needs_golden
@pytest.mark.parametrize("config_name,keys_name", [("full_size_config.json", "full_size_keys.json"),
                                                   ("config.json", "tiny_keys.json")])
def test_state_dict_keys_and_shapes_equal_reference(config_name, keys_name):
    with torch.device("meta"):
        model = HiFTGenerator.from_config(_cfg(config_name)["hift"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    with open(GOLDEN_DIR / keys_name) as f:
        want = list(json.load(f)["hift.pt"].items())
    assert got == want


@pytest.fixture(scope="module")
def hift_state():
    return torch.load(str(GOLDEN_DIR / "hift.pt"), map_location="cpu", weights_only=True)


def _mel(frames: int = 12) -> torch.Tensor:
    return torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(5))


@needs_golden
def test_loader_accepts_legacy_weight_norm_names_and_generator_prefix(hift, hift_state):
    legacy = {}
    for k, v in hift_state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                              "weight_v")
        legacy["generator." + k] = v
    assert any(k.endswith(".weight_g") for k in legacy)
    model = HiFTGenerator.from_config(_cfg()["hift"])
    load_hift_state(model, legacy)
    mel = _mel()
    s = torch.zeros(1, 1, mel.shape[2] * 480)
    with torch.inference_mode():
        torch.testing.assert_close(model.decode(mel, s), hift.decode(mel, s), atol=1e-6, rtol=0)


@needs_golden
def test_loader_error_names_missing_unexpected_and_misshapen_keys(hift_state):
    bad = dict(hift_state)
    del bad["conv_post.bias"]
    bad["conv_post.extra"] = torch.zeros(1)
    bad["m_source.l_linear.weight"] = torch.zeros(1, 3)
    with pytest.raises(CheckpointError) as err:
        load_hift_state(HiFTGenerator.from_config(_cfg()["hift"]), bad)
    msg = str(err.value)
    assert "conv_post.bias" in msg and "conv_post.extra" in msg and "m_source.l_linear.weight" in msg


@needs_golden
def test_folding_weight_norm_keeps_output(hift_state):
    model = HiFTGenerator.from_config(_cfg()["hift"])
    load_hift_state(model, hift_state)
    mel, s = _mel(), torch.randn(1, 1, 12 * 480, generator=torch.Generator().manual_seed(6)) * 0.1
    with torch.inference_mode():
        before = model.decode(mel, s)
        model.fold_weight_norm()
        after = model.decode(mel, s)
    assert not any("parametrizations" in k for k in model.state_dict())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@needs_golden
def test_explicit_generator_reproduces_and_leaves_global_rng_alone(hift):
    mel = _mel(20)
    global_state = torch.get_rng_state()
    a = hift.inference(mel, generator=torch.Generator().manual_seed(3))
    b = hift.inference(mel, generator=torch.Generator().manual_seed(3))
    c = hift.inference(mel, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert a[0].shape == (1, 20 * 480) and a[1].shape == (1, 1, 20 * 480)
    assert a[0].abs().max() <= hift.cfg.audio_limit


@needs_golden
def test_cache_source_overwrites_start_of_excitation(hift):
    mel = _mel(16)
    cache = torch.full((1, 1, 3840), 0.25)
    _, s = hift.inference(mel, cache_source=cache, generator=torch.Generator().manual_seed(0))
    _, s_free = hift.inference(mel, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s[:, :, :3840], cache)
    assert torch.equal(s[:, :, 3840:], s_free[:, :, 3840:])


@needs_golden
def test_injected_draws_are_used(hift):
    mel = _mel(4)
    n = 4 * 480
    zeros = SourceDraws(rand_ini=torch.zeros(1, 9), noise_randn=torch.zeros(1, n, 9))
    _, s1 = hift.inference(mel, draws=zeros)
    _, s2 = hift.inference(mel, draws=zeros)
    big = SourceDraws(rand_ini=torch.zeros(1, 9), noise_randn=torch.ones(1, n, 9))
    _, s3 = hift.inference(mel, draws=big)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
