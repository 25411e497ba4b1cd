"""Tensor contracts between the gateway and the stage servers (Triton model names, tensor names).

One place for names that cross a process boundary. Shapes exclude Triton's batch dimension where the
model config has max_batch_size > 0.
"""
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str   # Triton datatype string: FP32, INT32, BOOL, BYTES, UINT64
    dims: tuple[int, ...]
    optional: bool = False
    # An optional input that changes the result (token2wav's `speed`): the gateway refuses a call that carries it
    # to a replica whose model does not declare it, rather than leaving it out as it does for hints.
    honoured_or_refused: bool = False


# --- tokenizer stage: 16 kHz prompt -> speech codes (+SPEECH_ID_OFFSET, as the seed's audio_tokenizer) ---
TOKENIZER_MODEL = "audio_tokenizer"
TOKENIZER_INPUTS = (
    TensorSpec("reference_wav", "FP32", (-1,)),          # 16 kHz mono, may be zero-padded
    TensorSpec("reference_wav_len", "INT32", (1,)),
)
TOKENIZER_OUTPUTS = (TensorSpec("prompt_speech_tokens", "INT32", (-1,)),)

# --- speaker stage: 16 kHz prompt -> x-vector; 24 kHz prompt -> prompt mel -------------------------
SPEAKER_MODEL = "speaker_embedding"
SPEAKER_INPUTS = (
    TensorSpec("reference_wav", "FP32", (-1,)),          # 16 kHz mono
    TensorSpec("reference_wav_len", "INT32", (1,)),
    TensorSpec("reference_wav_24k", "FP32", (-1,), optional=True),   # 24 kHz mono (for the prompt mel)
    TensorSpec("reference_wav_24k_len", "INT32", (1,), optional=True),
)
SPEAKER_OUTPUTS = (
    TensorSpec("prompt_spk_embedding", "FP32", (192,)),
    TensorSpec("prompt_speech_feat", "FP32", (-1, 80)),  # 50 Hz log-mel frames (empty when no 24 kHz input)
)

# --- llm stage: the TensorRT-LLM backend's tensor contract (decoupled, streaming) --------------------
LLM_MODEL = "llm"
LLM_INPUTS = (
    TensorSpec("input_ids", "INT32", (-1,)),             # flat vocabulary (see constants)
    TensorSpec("input_lengths", "INT32", (1,)),
    TensorSpec("request_output_len", "INT32", (1,)),     # max new tokens
    TensorSpec("end_id", "INT32", (1,), optional=True),
    TensorSpec("pad_id", "INT32", (1,), optional=True),
    TensorSpec("streaming", "BOOL", (1,), optional=True),
    TensorSpec("min_length", "INT32", (1,), optional=True),       # min new tokens (eos masked before)
    TensorSpec("runtime_top_k", "INT32", (1,), optional=True),
    TensorSpec("runtime_top_p", "FP32", (1,), optional=True),
    TensorSpec("temperature", "FP32", (1,), optional=True),
    TensorSpec("random_seed", "UINT64", (1,), optional=True),
)
# Ours, not TensorRT-LLM's (which rejects unknown inputs): the gateway's stage client sends it only to a replica whose
# served `llm` model config lists it. Cumulative generated-token counts at which a streaming response is sent; tokens
# in between are held back (services/llm/README.md).
LLM_STREAM_BOUNDARIES = TensorSpec("stream_boundaries", "INT32", (-1,), optional=True)
LLM_INPUTS = (*LLM_INPUTS, LLM_STREAM_BOUNDARIES)
LLM_OUTPUTS = (
    TensorSpec("output_ids", "INT32", (-1, -1)),         # [beam=1, new tokens in this response]
    TensorSpec("sequence_length", "INT32", (-1,)),
)

# --- token2wav stage: stateless chunk calls; the vocoder overlap cache travels with the request ------
TOKEN2WAV_MODEL = "token2wav"
TOKEN2WAV_INPUTS = (
    TensorSpec("target_speech_tokens", "INT32", (-1,)),  # flat ids (code + SPEECH_ID_OFFSET), whole prefix
    TensorSpec("prompt_speech_tokens", "INT32", (-1,)),  # flat ids
    TensorSpec("prompt_speech_feat", "FP32", (-1, 80)),
    TensorSpec("prompt_spk_embedding", "FP32", (192,)),
    TensorSpec("token_offset", "INT32", (1,), optional=True),     # absent = offline (one pass)
    TensorSpec("finalize", "BOOL", (1,), optional=True),
    TensorSpec("cache_mel", "FP32", (80, -1), optional=True),     # previous chunk's last 8 mel frames
    TensorSpec("cache_source", "FP32", (-1,), optional=True),     # previous chunk's last 3840 source samples
    TensorSpec("cache_speech", "FP32", (-1,), optional=True),     # previous chunk's withheld 3840 samples
    # The request's seed for the vocoder's source noise; the stage mixes it with token_offset per chunk
    # (`cosyvoice_token2wav.sequence.chunk_seed`). Absent = the process RNG (not reproducible).
    TensorSpec("seed", "UINT64", (1,), optional=True),
)
# Offline calls only (no token_offset): the final mel is stretched linearly in time to int(frames / speed) before
# the vocoder, as the reference's `speed`. Absent = 1.0. The gateway sends it only when it is not 1.
TOKEN2WAV_SPEED = TensorSpec("speed", "FP32", (1,), optional=True, honoured_or_refused=True)
# A prompt only (target_speech_tokens empty): the stage computes the prompt's complete blocks into its state cache
# and answers an empty waveform, so the stream's first chunk computes little more than its own frames. The gateway
# sends it while the LLM decodes, to the replica that will serve the stream.
TOKEN2WAV_PREFILL = TensorSpec("prefill", "BOOL", (1,), optional=True, honoured_or_refused=True)
TOKEN2WAV_INPUTS = (*TOKEN2WAV_INPUTS, TOKEN2WAV_SPEED, TOKEN2WAV_PREFILL)
TOKEN2WAV_OUTPUTS = (
    TensorSpec("waveform", "FP32", (-1,)),               # 24 kHz
    TensorSpec("cache_mel", "FP32", (80, -1)),           # empty on finalize
    TensorSpec("cache_source", "FP32", (-1,)),
    TensorSpec("cache_speech", "FP32", (-1,)),
)
