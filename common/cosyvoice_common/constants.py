"""Numbers of the CosyVoice2 model that more than one stage needs. Named, never repeated as literals."""

# --- audio -----------------------------------------------------------------------------------------
OUTPUT_SAMPLE_RATE_HZ = 24000          # HiFT output and prompt-mel rate
PROMPT_16K_SAMPLE_RATE_HZ = 16000      # speech tokenizer and speaker model input rate
MEL_BINS = 80
MEL_HOP_SAMPLES = 480                  # 24 kHz samples per mel frame (50 Hz)
TOKEN_FRAME_RATE_HZ = 25               # speech tokens per second
TOKEN_MEL_RATIO = 2                    # mel frames per speech token
SAMPLES_PER_TOKEN = MEL_HOP_SAMPLES * TOKEN_MEL_RATIO  # 960 samples = 40 ms
SPEAKER_EMBEDDING_DIM = 192
SUPPORTED_OUTPUT_RATES_HZ = (8000, 16000, 22050, 24000, 44100, 48000)

# --- speech vocabulary (the LLM's 6564-way head) ------------------------------------------------------
SPEECH_CODEBOOK_SIZE = 6561            # codes 0..6560 (FSQ, 3^8)
SPEECH_EOS = 6561                      # stop ids: 6561 (eos), 6562, 6563 (fill; bistream only)
SPEECH_STOP_IDS = (6561, 6562, 6563)
SPEECH_HEAD_SIZE = 6564

# --- the flat vocabulary of the TensorRT-LLM / Hugging Face export (spec 8.5) --------------------------
# Text ids are the Qwen2 tokenizer's (with CosyVoice2's added special tokens, length 151663);
# speech code k is id SPEECH_ID_OFFSET + k; then eos1..3, sos, task_id; padded to 158336 rows.
SPEECH_ID_OFFSET = 151663
FLAT_EOS1_ID = SPEECH_ID_OFFSET + 6561   # 158224, the TRT-LLM end_id
FLAT_EOS2_ID = SPEECH_ID_OFFSET + 6562
FLAT_EOS3_ID = SPEECH_ID_OFFSET + 6563
FLAT_SOS_ID = SPEECH_ID_OFFSET + 6564    # 158227 <|sos|>
FLAT_TASK_ID = SPEECH_ID_OFFSET + 6565   # 158228 <|task_id|>
FLAT_VOCAB_SIZE = 158336                 # 158229 padded to a multiple of 128

# --- length rules (spec 4.4) -------------------------------------------------------------------------
MIN_TOKEN_TEXT_RATIO = 2
MAX_TOKEN_TEXT_RATIO = 20

# --- streaming schedule (spec 7) ---------------------------------------------------------------------
PRE_LOOKAHEAD_TOKENS = 3
FIRST_CHUNK_TOKENS = 15                 # our first hop (the seed's): 15 + 3 lookahead tokens
TOKEN_HOP_TOKENS = 25                   # the reference's first hop
TOKEN_MAX_HOP_TOKENS = 100
STREAM_SCALE_FACTOR = 2
HIFT_MEL_CACHE_FRAMES = 8
HIFT_SOURCE_CACHE_SAMPLES = 3840        # = 8 mel frames * 480
PROMPT_MAX_SECONDS = 30.0
PROMPT_MIN_SECONDS = 0.5

# --- speed (offline only, as the reference: the final mel is stretched linearly in time before HiFT) ---------
# The reference web UI's range: past 2x or below 0.5x the linear mel stretch smears or drops phonemes.
SPEED_NEUTRAL = 1.0
MIN_SPEED = 0.5
MAX_SPEED = 2.0

# --- capacity (every stage agrees on these; the llm stage's own value is read from its model config) ----
MAX_SPEECH_TOKENS = 3000                # the API's bound per segment: 120 s of audio
PROMPT_MAX_SPEECH_TOKENS = int(PROMPT_MAX_SECONDS * TOKEN_FRAME_RATE_HZ)   # 750: a 30 s prompt's tokens
# Default positions per llm slot (prompt + generated): holds MAX_SPEECH_TOKENS after the longest prompt
# (LLM_PROMPT_BUDGET_POSITIONS: sos, task, a 30 s prompt's tokens, and prompt + target text tokens).
LLM_PROMPT_BUDGET_POSITIONS = 1096
LLM_MAX_SEQ_LEN = MAX_SPEECH_TOKENS + LLM_PROMPT_BUDGET_POSITIONS          # 4096


# --- Redis (spk2info cache + speaker registry) -------------------------------------------------------------
# Bounded memory; volatile-lru evicts only keys with a TTL (cached prompts), never named voices (no expiry).
REDIS_MAXMEMORY = "1gb"
REDIS_EVICTION_POLICY = "volatile-lru"
REDIS_BOUND_ARGS = ("--maxmemory", REDIS_MAXMEMORY, "--maxmemory-policy", REDIS_EVICTION_POLICY)
MAX_NAMED_SPEAKERS = 10_000             # per model revision; more registrations are RESOURCE_EXHAUSTED


def speech_code_to_flat_id(code: int) -> int:
    return code + SPEECH_ID_OFFSET


def flat_id_to_speech_code(flat_id: int) -> int:
    return flat_id - SPEECH_ID_OFFSET
