"""Seed drop-in: the speakers of a seed-format `spk2info.pt` (spec 1.6) as named speakers of the registry.

Two layouts are read (torch-free, `cosyvoice_gateway.torchfile`):

- the Triton recipe's (third-party async_cosyvoice): `{"001": {prompt_text: str, prompt_text_token,
  speech_token: int32[1,T], speech_feat: f32[1,2T,80], embedding: f32[1,192], ...}}`;
- the reference's `add_zero_shot_spk` + `save_spkinfo`: `{id: {prompt_text: int32[1,Lp] (ids),
  flow_prompt_speech_token / llm_prompt_speech_token, prompt_speech_feat, flow_embedding / llm_embedding, ...}}`.

Tokens and mel are aligned like an uploaded prompt (spec 3.5). Speech codes are the tokenizer's (0..6560, no
flat-vocabulary offset). A speaker already in the registry is left alone: registrations made through the API win.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cosyvoice_common.constants import MEL_BINS, SPEAKER_EMBEDDING_DIM, SPEECH_CODEBOOK_SIZE, TOKEN_FRAME_RATE_HZ, TOKEN_MEL_RATIO

from cosyvoice_gateway import torchfile
from cosyvoice_gateway.spk2info import (
    PromptFeatures,
    RegistryUnavailableError,
    SpeakerExistsError,
    SpeakerLimitError,
    Spk2InfoCache,
)

log = logging.getLogger(__name__)

SPK2INFO_NAME = "spk2info.pt"
_TOKEN_KEYS = ("speech_token", "flow_prompt_speech_token", "llm_prompt_speech_token")
_FEAT_KEYS = ("speech_feat", "prompt_speech_feat")
_EMBEDDING_KEYS = ("embedding", "flow_embedding", "spk_emb", "llm_embedding")
_TEXT_ID_KEYS = ("prompt_text_token", "prompt_text")


class SeedSpeakerError(ValueError):
    """An entry of spk2info.pt that is not a usable prompt."""


def _first(entry: Mapping[str, Any], keys: Sequence[str], what: str) -> np.ndarray:
    for key in keys:
        value = entry.get(key)
        if isinstance(value, np.ndarray):
            return value
    raise SeedSpeakerError(f"no {what} (looked for {', '.join(keys)})")


def features_from_entry(entry: Mapping[str, Any], encode_text: Callable[[str], Sequence[int]] | None = None
                        ) -> PromptFeatures:
    """One spk2info.pt entry as aligned PromptFeatures."""
    if not isinstance(entry, Mapping):
        raise SeedSpeakerError(f"entry is a {type(entry).__name__}, not a dict")
    codes = _first(entry, _TOKEN_KEYS, "speech tokens").astype(np.int64).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= SPEECH_CODEBOOK_SIZE):
        raise SeedSpeakerError(f"speech tokens outside 0..{SPEECH_CODEBOOK_SIZE - 1}")
    feat = _first(entry, _FEAT_KEYS, "prompt mel").astype(np.float32)
    feat = feat.reshape(-1, feat.shape[-1])
    if feat.shape[-1] != MEL_BINS:
        raise SeedSpeakerError(f"prompt mel has {feat.shape[-1]} bins, expected {MEL_BINS}")
    embedding = _first(entry, _EMBEDDING_KEYS, "speaker embedding").astype(np.float32).reshape(-1)
    if embedding.shape != (SPEAKER_EMBEDDING_DIM,):
        raise SeedSpeakerError(f"speaker embedding has {embedding.size} values, expected {SPEAKER_EMBEDDING_DIM}")
    n = min(feat.shape[0] // TOKEN_MEL_RATIO, codes.shape[0])
    if n == 0:
        raise SeedSpeakerError("no speech tokens")

    text = entry.get("prompt_text")
    text = text if isinstance(text, str) else ""
    text_ids = None
    for key in _TEXT_ID_KEYS:
        if isinstance(entry.get(key), np.ndarray):
            text_ids = entry[key].astype(np.int32).reshape(-1)
            break
    if text_ids is None:
        text_ids = np.asarray(encode_text(text) if (text and encode_text) else [], np.int32)
    if text_ids.size and not text:
        text = f"[{text_ids.size} prompt text ids]"     # the reference stores ids only; zero-shot all the same
    return PromptFeatures(
        speech_codes=codes[:n].astype(np.int32), speech_feat=np.ascontiguousarray(feat[: TOKEN_MEL_RATIO * n]),
        spk_embedding=embedding, text_ids=text_ids, prompt_text=text, prompt_seconds=n / TOKEN_FRAME_RATE_HZ)


def read_spk2info(path: str | Path, encode_text: Callable[[str], Sequence[int]] | None = None
                  ) -> dict[str, PromptFeatures]:
    """Every usable speaker of a seed-format spk2info.pt; unusable entries are logged and skipped."""
    data = torchfile.load(path)
    if not isinstance(data, Mapping):
        raise SeedSpeakerError(f"{path}: a {type(data).__name__}, not a dict of speakers")
    out = {}
    for name, entry in data.items():
        try:
            out[str(name)] = features_from_entry(entry, encode_text)
        except SeedSpeakerError as exc:
            log.warning("%s: speaker %r skipped: %s", path, name, exc)
    return out


async def import_spk2info(cache: Spk2InfoCache, path: str | Path,
                          encode_text: Callable[[str], Sequence[int]] | None = None) -> list[str]:
    """Register the file's speakers that the registry does not hold yet; returns their names. Raises
    RegistryUnavailableError when Redis cannot be reached (the caller retries)."""
    speakers = read_spk2info(path, encode_text)
    added = []
    for name, features in speakers.items():
        try:
            await cache.register_speaker(name, features, replace=False)
        except SpeakerExistsError:
            continue
        except SpeakerLimitError as exc:
            log.error("spk2info: %s; %s and later speakers of %s not imported", exc, name, path)
            break
        added.append(name)
    if added:
        log.info("spk2info: imported %s from %s", ", ".join(added), path)
    return added


async def import_model_speakers(cache: Spk2InfoCache, model_dir: str | Path,
                                encode_text: Callable[[str], Sequence[int]] | None = None) -> bool:
    """Import `<model_dir>/spk2info.pt` when there is one. True when settled (no file, imported, or a file that
    cannot be read, logged); False when the registry was unreachable, so the caller tries again later."""
    path = Path(model_dir) / SPK2INFO_NAME
    if not path.is_file():
        return True
    try:
        await import_spk2info(cache, path, encode_text)
    except RegistryUnavailableError as exc:
        log.warning("spk2info: %s not imported yet: %s", path, exc)
        return False
    except (torchfile.TorchFileError, SeedSpeakerError, OSError) as exc:
        log.error("spk2info: cannot import %s: %s", path, exc)
    return True
