"""What the gateway reads from the model directory itself: the text tokenizer and a revision of the weights."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

# The files whose start and end bytes identify a checkpoint (the cache key's model revision).
_REVISION_FILES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx")
_REVISION_PROBE_BYTES = 1 << 20


def model_revision(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in _REVISION_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(_REVISION_PROBE_BYTES))
            if size > _REVISION_PROBE_BYTES:
                f.seek(-_REVISION_PROBE_BYTES, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def load_text_encoder(model_dir: Path):
    from cosyvoice_common.text import TextTokenizer

    return TextTokenizer.from_dir(model_dir / "CosyVoice-BlankEN").encode
