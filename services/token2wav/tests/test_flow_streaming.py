"""Flow streaming rules (spec 5.5) and the batched CFM/estimator path, on the golden tiny checkpoint."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cosyvoice_common.constants import TOKEN_MEL_RATIO
from cosyvoice_common.golden import MISSING_HINT, golden_dir
from cosyvoice_token2wav.flow import build_flow, load_flow_state

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")   # 2 shared CI cores

_REPO = Path(__file__).resolve().parents[3]
GOLDEN_DIR = golden_dir()
ATOL = 1e-4
ENCODER_CHUNK_TOKENS = 25      # tiny-seed1 encoder static_chunk_size (= the full model's)





@pytest.fixture(scope="module")
def golden():
    if not (GOLDEN_DIR / "flow.npz").is_file():
        pytest.skip(MISSING_HINT)
    z = np.load(GOLDEN_DIR / "flow.npz")
    flow_cfg = json.loads((GOLDEN_DIR / "config.json").read_text())["flow"]
    flow = load_flow_state(build_flow(flow_cfg), GOLDEN_DIR / "flow.pt", "cpu")
    inputs = {k: torch.from_numpy(z[k]) for k in ("token", "prompt_token", "prompt_feat", "embedding")}
    inputs["_cache"] = {}   # mels shared between tests (the machine is small)
    return flow, z, inputs


def _mel(flow, inputs, n_tokens: int, streaming: bool, finalize: bool) -> torch.Tensor:
    key = (n_tokens, streaming, finalize)
    if key not in inputs["_cache"]:
        inputs["_cache"][key] = _run_mel(flow, inputs, n_tokens, streaming, finalize)
    return inputs["_cache"][key]


def _run_mel(flow, inputs, n_tokens: int, streaming: bool, finalize: bool) -> torch.Tensor:
    token = inputs["token"][:, :n_tokens]
    mel, extra = flow.inference(token, torch.tensor([n_tokens]), inputs["prompt_token"],
                                torch.tensor([inputs["prompt_token"].size(1)]), inputs["prompt_feat"],
                                torch.tensor([inputs["prompt_feat"].size(1)]), inputs["embedding"],
                                streaming=streaming, finalize=finalize)
    assert extra is None and mel.dtype == torch.float32
    return mel


def test_non_final_call_drops_lookahead_tokens_and_matches_final_call_on_complete_chunks(golden):
    flow, z, inputs = golden
    n_prompt, n_tokens = inputs["prompt_token"].size(1), inputs["token"].size(1)
    lookahead = flow.cfg.pre_lookahead_len_tokens
    nofinal = _mel(flow, inputs, n_tokens, streaming=True, finalize=False)
    final = _mel(flow, inputs, n_tokens, streaming=True, finalize=True)
    assert nofinal.shape[-1] == TOKEN_MEL_RATIO * (n_tokens - lookahead)
    assert final.shape[-1] == TOKEN_MEL_RATIO * n_tokens
    # Only tokens of encoder chunks that are complete in the non-final call are guaranteed to agree.
    complete_tokens = (n_prompt + n_tokens - lookahead) // ENCODER_CHUNK_TOKENS * ENCODER_CHUNK_TOKENS - n_prompt
    frames = TOKEN_MEL_RATIO * complete_tokens
    assert 0 < frames < nofinal.shape[-1]
    assert np.abs(nofinal[..., :frames].numpy() - final[..., :frames].numpy()).max() < ATOL
    # the reference shows the same agreement
    assert np.abs(z["stream_nofinal__mel"][..., :frames] - z["stream_full_finalize__mel"][..., :frames]).max() < ATOL
    # ...and the incomplete last chunk does change once the real tokens arrive
    assert np.abs(nofinal[..., frames:].numpy() - final[..., frames:nofinal.shape[-1]].numpy()).max() > ATOL


def test_chunk_aligned_streaming_calls_recompute_emitted_frames_identically(golden):
    """The token2wav schedule (prompt 30): hop 15+3 then 50; prompt+emitted tokens land on 25-token boundaries,
    so frames emitted by the first call are reproduced by the second (spec 5.5)."""
    flow, _, inputs = golden
    lookahead = flow.cfg.pre_lookahead_len_tokens
    first_emitted, second_emitted = 45, 95
    first = _mel(flow, inputs, first_emitted + lookahead, streaming=True, finalize=False)
    second = _mel(flow, inputs, second_emitted + lookahead, streaming=True, finalize=False)
    frames = TOKEN_MEL_RATIO * first_emitted
    assert first.shape[-1] == frames and second.shape[-1] == TOKEN_MEL_RATIO * second_emitted
    assert np.abs(first.numpy() - second[..., :frames].numpy()).max() < ATOL


def test_streaming_attention_differs_from_offline(golden):
    flow, z, inputs = golden
    n_tokens = inputs["token"].size(1)
    offline = _mel(flow, inputs, n_tokens, streaming=False, finalize=True)
    streamed = _mel(flow, inputs, n_tokens, streaming=True, finalize=True)
    assert np.abs(offline.numpy() - z["offline__mel"]).max() < ATOL
    assert np.abs(offline.numpy() - streamed.numpy()).max() > 100 * ATOL


@pytest.mark.parametrize("streaming", [False, True])
def test_batched_cfm_with_padding_equals_per_request_solves(golden, streaming):
    """B requests -> 2B estimator rows; a shorter request padded (mask 0) gets the same mel on its valid frames."""
    flow, z, _ = golden
    # the reference's own encoder outputs for two different requests (300 and 294 frames); spks negated so the
    # rows differ beyond their lengths
    long_mu, long_cond = torch.from_numpy(z["offline__mu"]), torch.from_numpy(z["offline__cond"])
    long_spks = torch.from_numpy(z["offline__spks"])
    short_mu, short_cond = torch.from_numpy(z["stream_nofinal__mu"]), torch.from_numpy(z["stream_nofinal__cond"])
    short_spks = -torch.from_numpy(z["stream_nofinal__spks"])
    frames, short_frames = long_mu.size(-1), short_mu.size(-1)
    pad = frames - short_frames
    assert pad > 0

    def padded(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, pad))

    n_steps = 2   # enough to exercise the loop; keeps the test fast
    mu = torch.cat([long_mu, padded(short_mu)])
    cond = torch.cat([long_cond, padded(short_cond)])
    spks = torch.cat([long_spks, short_spks])
    mask = torch.ones(2, 1, frames)
    mask[1, :, short_frames:] = 0
    with torch.inference_mode():
        batched = flow.decoder(mu, mask, spks, cond, n_timesteps=n_steps, streaming=streaming)
        solo_long = flow.decoder(long_mu, mask[:1], long_spks, long_cond, n_timesteps=n_steps, streaming=streaming)
        solo_short = flow.decoder(short_mu, mask[1:, :, :short_frames], short_spks, short_cond,
                                  n_timesteps=n_steps, streaming=streaming)
    assert batched.shape == (2, 80, frames)
    assert np.abs(batched[:1].numpy() - solo_long.numpy()).max() < 1e-5
    assert np.abs(batched[1:, :, :short_frames].numpy() - solo_short.numpy()).max() < 1e-5
    assert np.abs(solo_long[..., :short_frames].numpy() - solo_short.numpy()).max() > ATOL   # rows really differ
