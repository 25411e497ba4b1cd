"""Model-directory config: read a CosyVoice2 `cosyvoice2.yaml` (HyperPyYAML) into the golden `config.json` shape.

The released yaml is HyperPyYAML: `!new:pkg.Class` builds an object from the mapping below it, `!name:pkg.fn`
is a partial, `!ref <key>` points at another key (also inside strings and simple arithmetic such as
`<chunk_size> * <token_mel_ratio>`), `!apply:fn [args]` runs a function at load time (the seed lines). We never
import or run any of it: classes become `{"__class__": "pkg.Class", **kwargs}`, partials
`{"__fn__": "pkg.fn", **kwargs}`, which is the layout of the golden `config.json` that every `from_config`
builder takes. Unknown tags are kept as `{"__tag__": tag, "__value__": value}` so a newer yaml still loads.

`load_model_config` also adds the values the reference hard-codes in source (`__not_in_yaml__` blocks, sized
from the yaml so a tiny model stays consistent) and the Qwen2 config from `CosyVoice-BlankEN/config.json`.
"""
from __future__ import annotations

import ast
import copy
import hashlib
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .constants import (
    HIFT_MEL_CACHE_FRAMES,
    HIFT_SOURCE_CACHE_SAMPLES,
    PRE_LOOKAHEAD_TOKENS,
    STREAM_SCALE_FACTOR,
    TOKEN_HOP_TOKENS,
    TOKEN_MAX_HOP_TOKENS,
)

# --- file names of a model directory (spec 1.1) ----------------------------------------------------------------
YAML_NAME = "cosyvoice2.yaml"
LEGACY_YAML_NAME = "cosyvoice.yaml"          # pre-2025 revisions
LLM_CHECKPOINT_NAME = "llm.pt"
FLOW_CHECKPOINT_NAME = "flow.pt"
HIFT_CHECKPOINT_NAME = "hift.pt"
CAMPPLUS_ONNX_NAME = "campplus.onnx"
SPEECH_TOKENIZER_ONNX_NAME = "speech_tokenizer_v2.onnx"
QWEN2_DIR_NAME = "CosyVoice-BlankEN"
QWEN2_CONFIG_NAME = "config.json"
GOLDEN_CONFIG_NAME = "config.json"
CHECKPOINT_NAMES = (LLM_CHECKPOINT_NAME, FLOW_CHECKPOINT_NAME, HIFT_CHECKPOINT_NAME)
# Written last by the random-weight generator (cosyvoice_tools.modelgen): its presence = a generated model.
GENERATED_MARKER_NAME = "GENERATED.json"

# The reference's override for the yaml's empty `qwen_pretrain_path` (CosyVoice2.__init__ does the same).
QWEN_PRETRAIN_PATH_KEY = "qwen_pretrain_path"

# Values hard-coded in the reference source, not in the yaml (golden config.json `__not_in_yaml__`).
ENCODER_NUM_UP_BLOCKS = 4
ENCODER_UP_STRIDE = 2
ENCODER_ACTIVATION = "swish"
ENCODER_POS_ENC_MAX_LEN = 5000
FLOW_N_TIMESTEPS = 10
HIFT_WEIGHT_NORM = "torch.nn.utils.parametrizations.weight_norm (dim=0)"

# model_revision hashes this much of the head and tail of each checkpoint: enough to tell two random or two real
# checkpoints apart, cheap enough for a 2 GB llm.pt.
REVISION_SAMPLE_BYTES = 1 << 20
REVISION_HEX_CHARS = 16


# ============================================================================================================
# HyperPyYAML parsing
# ============================================================================================================

@dataclass(frozen=True, slots=True)
class _Ref:
    """An unresolved `!ref` / `!copy` expression, resolved after the whole document is read."""
    expr: str
    deep_copy: bool = False


_REF_TOKEN = re.compile(r"<([^<>]+)>")
_FLOAT_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
_SAFE_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
                ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_SAFE_UNOPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class _HyperLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-06` as a float (YAML 1.1 needs a dot; HyperPyYAML accepts it)."""


_HyperLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _node_value(loader: yaml.Loader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


def _call_node(kind_key: str, loader: yaml.Loader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value = _node_value(loader, node)
    out: dict[str, Any] = {kind_key: suffix}
    if isinstance(value, dict):
        out.update(value)
    elif isinstance(value, list):
        out["__args__"] = value
    elif value not in ("", None):
        out["__args__"] = [value]
    return out


def _construct_new(loader, suffix, node):
    out = _call_node("__class__", loader, suffix, node)
    # cfm_params: !new:omegaconf.DictConfig {content: {...}} is just a dict to every consumer.
    if suffix == _DICTCONFIG_CLASS and set(out) == {"__class__", "content"}:
        return out["content"]
    return out


def _construct_ref(loader, node):
    return _Ref(str(loader.construct_scalar(node)).strip())


def _construct_copy(loader, node):
    return _Ref(str(loader.construct_scalar(node)).strip(), deep_copy=True)


def _construct_tuple(loader, node):
    return tuple(loader.construct_sequence(node, deep=True))


def _construct_unknown(loader, tag_suffix, node):
    return {"__tag__": "!" + tag_suffix, "__value__": _node_value(loader, node)}


_HyperLoader.add_multi_constructor("!new:", _construct_new)
_HyperLoader.add_multi_constructor("!name:", lambda l, s, n: _call_node("__fn__", l, s, n))
_HyperLoader.add_multi_constructor("!apply:", lambda l, s, n: _call_node("__apply__", l, s, n))
_HyperLoader.add_multi_constructor("!module:", lambda l, s, n: {"__module__": s})
_HyperLoader.add_constructor("!ref", _construct_ref)
_HyperLoader.add_constructor("!copy", _construct_copy)
_HyperLoader.add_constructor("!tuple", _construct_tuple)
_HyperLoader.add_multi_constructor("!", _construct_unknown)   # registered last: the catch-all


def _lookup(root: Mapping[str, Any], key: str) -> Any:
    """`a`, `a[b][c]` or `a.b` (HyperPyYAML's two nested spellings)."""
    parts = [p for p in re.split(r"[\[\].]", key) if p]
    node: Any = root
    for part in parts:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit():
            node = node[int(part)]
        else:
            raise KeyError(f"!ref <{key}>: no key {part!r}")
    return node


def _safe_eval(expr: str) -> Any:
    """Arithmetic on numbers only (what HyperPyYAML allows in `!ref <a> * <b>`)."""
    def ev(n: ast.AST) -> Any:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _SAFE_BINOPS:
            return _SAFE_BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and type(n.op) in _SAFE_UNOPS:
            return _SAFE_UNOPS[type(n.op)](ev(n.operand))
        raise ValueError("not arithmetic")
    return ev(ast.parse(expr, mode="eval"))


class _Resolver:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.active: set[str] = set()

    def key_value(self, key: str) -> Any:
        if key in self.active:
            raise ValueError(f"!ref cycle through <{key}>")
        self.active.add(key)
        try:
            return self.resolve(_lookup(self.root, key))
        finally:
            self.active.discard(key)

    def ref(self, r: _Ref) -> Any:
        whole = _REF_TOKEN.fullmatch(r.expr)
        if whole:
            value = self.key_value(whole.group(1))
            return copy.deepcopy(value) if r.deep_copy else value
        # `<a> * <b>` evaluates; `<dir>/file` and other text substitutes as a string.
        values = {m.group(1): self.key_value(m.group(1)) for m in _REF_TOKEN.finditer(r.expr)}
        text = _REF_TOKEN.sub(lambda m: repr(values[m.group(1)]), r.expr)
        try:
            return _safe_eval(text)
        except (ValueError, SyntaxError, TypeError, ZeroDivisionError):
            return _REF_TOKEN.sub(lambda m: str(values[m.group(1)]), r.expr)

    def resolve(self, node: Any) -> Any:
        if isinstance(node, _Ref):
            return self.ref(node)
        if isinstance(node, dict):
            for k in list(node):
                node[k] = self.resolve(node[k])
            return node
        if isinstance(node, list):
            return [self.resolve(v) for v in node]
        if isinstance(node, tuple):
            return tuple(self.resolve(v) for v in node)
        return node


def parse_hyperpyyaml(text: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Parse HyperPyYAML text into plain dicts (see module doc). Top-level `overrides` replace keys before `!ref`s
    resolve, as HyperPyYAML's `overrides=` does. Top-level `__*` keys (the `!apply` seed lines) are dropped."""
    raw = yaml.load(text, Loader=_HyperLoader)  # noqa: S506 - our loader subclasses SafeLoader
    if not isinstance(raw, dict):
        raise ValueError("model yaml must be a mapping at the top level")
    if overrides:
        raw.update(overrides)
    resolved = _Resolver(raw).resolve(raw)
    return {k: v for k, v in resolved.items() if not str(k).startswith("__")}


# ============================================================================================================
# Model config (golden config.json shape)
# ============================================================================================================

def find_model_yaml(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    for name in (YAML_NAME, LEGACY_YAML_NAME):
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(f"no {YAML_NAME} (or {LEGACY_YAML_NAME}) in {model_dir}")


def load_qwen2_config(model_dir: str | Path) -> dict[str, Any]:
    """`<model_dir>/CosyVoice-BlankEN/config.json` (Hugging Face Qwen2 config)."""
    path = Path(model_dir) / QWEN2_DIR_NAME / QWEN2_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"Qwen2 config not found: {path}")
    return json.loads(path.read_text())


def add_source_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill the `__not_in_yaml__` blocks the reference hard-codes in source, in the golden config.json layout.
    The hard-coded 512-wide encoder layers are sized to the encoder's `output_size` (512 in the real model; the
    tiny models replace them the same way). Existing blocks are kept. Returns `cfg` (changed in place)."""
    encoder = cfg.get("flow", {}).get("encoder")
    if isinstance(encoder, dict) and "output_size" in encoder:
        width = encoder["output_size"]
        pre_lookahead = cfg["flow"].get("pre_lookahead_len", PRE_LOOKAHEAD_TOKENS)
        chunk = encoder.get("static_chunk_size", cfg.get("chunk_size", TOKEN_HOP_TOKENS))
        encoder.setdefault("__not_in_yaml__", {
            "pre_lookahead_layer": {"in_channels": width, "channels": width, "pre_lookahead_len": pre_lookahead},
            "up_layer": {"channels": width, "out_channels": width, "stride": ENCODER_UP_STRIDE},
            "num_up_blocks": ENCODER_NUM_UP_BLOCKS,
            "activation_type": ENCODER_ACTIVATION,
            "key_bias": True,
            "pos_enc_max_len": ENCODER_POS_ENC_MAX_LEN,
            "up_encoder_static_chunk_size_when_streaming": chunk * ENCODER_UP_STRIDE,
        })
    hift = cfg.get("hift")
    if isinstance(hift, dict):
        hift.setdefault("__not_in_yaml__", {"weight_norm": HIFT_WEIGHT_NORM})
    cfg.setdefault("cosyvoice2_model", {
        "token_hop_len": TOKEN_HOP_TOKENS,
        "token_max_hop_len": TOKEN_MAX_HOP_TOKENS,
        "stream_scale_factor": STREAM_SCALE_FACTOR,
        "mel_cache_len": HIFT_MEL_CACHE_FRAMES,
        "source_cache_len": HIFT_SOURCE_CACHE_SAMPLES,
    })
    return cfg


def load_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The model config of a model directory, in the golden `config.json` shape. Raises FileNotFoundError without a
    yaml. `cfg["llm"]["llm"]["qwen2_config"]` holds `CosyVoice-BlankEN/config.json` when that file exists."""
    model_dir = Path(model_dir)
    yaml_path = find_model_yaml(model_dir)
    qwen_dir = model_dir / QWEN2_DIR_NAME
    cfg = parse_hyperpyyaml(yaml_path.read_text(), overrides={QWEN_PRETRAIN_PATH_KEY: str(qwen_dir)})
    backbone = cfg.get("llm", {}).get("llm")
    if isinstance(backbone, dict) and (qwen_dir / QWEN2_CONFIG_NAME).is_file():
        backbone["qwen2_config"] = load_qwen2_config(model_dir)
    return add_source_defaults(cfg)


def load_golden_config(golden_dir: str | Path) -> dict[str, Any]:
    """A golden set's `config.json` (already in the shape `load_model_config` returns)."""
    path = Path(golden_dir) / GOLDEN_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"golden config not found: {path}")
    return json.loads(path.read_text())


def load_any_config(path: str | Path) -> dict[str, Any]:
    """A model dir (yaml) or a golden dir (config.json), whichever `path` is."""
    try:
        return load_model_config(path)
    except FileNotFoundError:
        return load_golden_config(path)


def qwen2_config_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The Qwen2 config embedded in a model/golden config (`llm.llm.qwen2_config`)."""
    try:
        return dict(cfg["llm"]["llm"]["qwen2_config"])
    except (KeyError, TypeError):
        raise KeyError("config has no llm.llm.qwen2_config (model dir without CosyVoice-BlankEN/config.json?)")


def model_revision(model_dir: str | Path) -> str:
    """Short stable id of a model's weights: sha256 over the yaml and, per checkpoint, its size plus its first and
    last MiB. Copies of a model dir share it (no mtimes); any re-generated or re-trained checkpoint changes it.
    Used as the spk2info cache key prefix."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    h.update(find_model_yaml(model_dir).read_bytes())
    for name in CHECKPOINT_NAMES:
        path = model_dir / name
        h.update(name.encode())
        if not path.is_file():
            h.update(b"<missing>")
            continue
        size = path.stat().st_size
        h.update(str(size).encode())
        with path.open("rb") as f:
            h.update(f.read(REVISION_SAMPLE_BYTES))
            if size > REVISION_SAMPLE_BYTES:
                f.seek(max(REVISION_SAMPLE_BYTES, size - REVISION_SAMPLE_BYTES))
                h.update(f.read(REVISION_SAMPLE_BYTES))
    return h.hexdigest()[:REVISION_HEX_CHARS]


# ============================================================================================================
# Writing a cosyvoice2.yaml
# ============================================================================================================

# Keys of the golden config.json that describe the source or the goldens, never yaml entries.
_NON_YAML_TOP_KEYS = ("campplus_fbank", "whisper_fbank", "cosyvoice2_model")
# Sub-keys computed by load_model_config / only descriptive in the golden file.
_NON_YAML_SUBKEYS = ("__not_in_yaml__", "qwen2_config")

# Where the released yaml writes `!ref <top-level key>` rather than a number (written so only when equal).
_YAML_REFS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("llm", "llm_input_size"), "<llm_input_size>"),
    (("llm", "llm_output_size"), "<llm_output_size>"),
    (("llm", "llm", "pretrain_path"), "<qwen_pretrain_path>"),
    (("flow", "spk_embed_dim"), "<spk_embed_dim>"),
    (("flow", "input_frame_rate"), "<token_frame_rate>"),
    (("flow", "token_mel_ratio"), "<token_mel_ratio>"),
    (("flow", "encoder", "static_chunk_size"), "<chunk_size>"),
    (("flow", "decoder", "estimator", "static_chunk_size"), "<chunk_size> * <token_mel_ratio>"),
    (("flow", "decoder", "estimator", "num_decoding_left_chunks"), "<num_decoding_left_chunks>"),
    (("hift", "sampling_rate"), "<sample_rate>"),
    (("feat_extractor", "sampling_rate"), "<sample_rate>"),
    (("get_tokenizer", "token_path"), "<qwen_pretrain_path>"),
)

_DICTCONFIG_KEYS = ("cfm_params",)
_DICTCONFIG_CLASS = "omegaconf.DictConfig"
_SCALAR_HEADER = ("sample_rate", "llm_input_size", "llm_output_size", "spk_embed_dim", "qwen_pretrain_path",
                  "token_frame_rate", "token_mel_ratio", "chunk_size", "num_decoding_left_chunks")
_SEED = 1986


def strip_to_yaml(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config that a yaml carries: drops golden-only bookkeeping (`__seed__`, `__not_in_yaml__`,
    `qwen2_config`, descriptive keys) and keys whose name is prose (contains a space)."""
    def clean(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: clean(v) for k, v in node.items()
                    if k not in _NON_YAML_SUBKEYS and " " not in k and not (k == "rand_noise" and isinstance(v, str))}
        if isinstance(node, (list, tuple)):
            return [clean(v) for v in node]
        return node
    return {k: clean(v) for k, v in cfg.items()
            if not str(k).startswith("__") and k not in _NON_YAML_TOP_KEYS}


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        s = repr(v)
        mantissa, sep, exp = s.partition("e")
        if sep and "." not in mantissa:       # 1e-06 -> 1.0e-06: a float in every YAML reader
            s = f"{mantissa}.0e{exp}"
        return s
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    raise TypeError(f"cannot write {type(v).__name__} to the model yaml")


def _flow_seq(v: list | tuple) -> str:
    return "[" + ", ".join(_flow_seq(x) if isinstance(x, (list, tuple)) else _scalar(x) for x in v) + "]"


class _YamlWriter:
    def __init__(self, refs: Mapping[tuple[str, ...], str]) -> None:
        self.lines: list[str] = []
        self.refs = refs

    def mapping_body(self, node: Mapping[str, Any], indent: int, path: tuple[str, ...]) -> None:
        for k, v in node.items():
            if k in ("__class__", "__fn__", "__apply__"):
                continue
            self.entry(k, v, indent, path + (k,))

    def entry(self, key: str, value: Any, indent: int, path: tuple[str, ...]) -> None:
        pad = " " * indent
        if path in self.refs:
            self.lines.append(f"{pad}{key}: !ref {self.refs[path]}")
            return
        if isinstance(value, Mapping):
            tag = ""
            if "__class__" in value:
                tag = f" !new:{value['__class__']}"
            elif "__fn__" in value:
                tag = f" !name:{value['__fn__']}"
            if "__args__" in value:
                self.lines.append(f"{pad}{key}:{tag} {_flow_seq(value['__args__'])}")
                return
            if not tag and key in _DICTCONFIG_KEYS:
                # The reference reads these with attribute access, so the yaml wraps them in an omegaconf DictConfig.
                self.lines.append(f"{pad}{key}: !new:{_DICTCONFIG_CLASS}")
                self.lines.append(f"{pad}    content:")
                self.mapping_body(value, indent + 8, path)
                return
            self.lines.append(f"{pad}{key}:{tag}")
            self.mapping_body(value, indent + 4, path)
            return
        if isinstance(value, (list, tuple)):
            self.lines.append(f"{pad}{key}: {_flow_seq(value)}")
            return
        self.lines.append(f"{pad}{key}: {_scalar(value)}")


def _get_path(cfg: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = cfg
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return _MISSING
        node = node[p]
    return node


_MISSING = object()


def model_yaml_text(cfg: Mapping[str, Any]) -> str:
    """HyperPyYAML text in the layout of the released cosyvoice2.yaml for `cfg` (golden config.json shape)."""
    body = strip_to_yaml(cfg)
    body.setdefault(QWEN_PRETRAIN_PATH_KEY, "")
    refs: dict[tuple[str, ...], str] = {}
    for path, expr in _YAML_REFS:
        value = _get_path(body, path)
        if value is _MISSING:
            continue
        try:
            want = _Resolver(dict(body)).ref(_Ref(expr))
        except KeyError:
            continue
        if path == ("llm", "llm", "pretrain_path") or value == want:
            refs[path] = expr
    w = _YamlWriter(refs)
    w.lines += [
        "# CosyVoice2 model config (HyperPyYAML). Written by cosyvoice_common.modelconfig.write_model_yaml.",
        "# Load-time seeding, as in the released file: the reference runs these four lines while reading it.",
        f"__set_seed1: !apply:random.seed [{_SEED}]",
        f"__set_seed2: !apply:numpy.random.seed [{_SEED}]",
        f"__set_seed3: !apply:torch.manual_seed [{_SEED}]",
        f"__set_seed4: !apply:torch.cuda.manual_seed_all [{_SEED}]",
        "",
        "# shared numbers (referenced below with !ref)",
    ]
    for key in _SCALAR_HEADER:
        if key in body:
            w.entry(key, body[key], 0, (key,))
    for key, value in body.items():
        if key in _SCALAR_HEADER:
            continue
        w.lines.append("")
        w.entry(key, value, 0, (key,))
    return "\n".join(w.lines) + "\n"


def write_model_yaml(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """Write `cfg` as a cosyvoice2.yaml; `load_model_config` on its directory reads back the same yaml keys."""
    path = Path(path)
    path.write_text(model_yaml_text(cfg))
    return path


__all__ = [
    "YAML_NAME", "LLM_CHECKPOINT_NAME", "FLOW_CHECKPOINT_NAME", "HIFT_CHECKPOINT_NAME", "CAMPPLUS_ONNX_NAME",
    "SPEECH_TOKENIZER_ONNX_NAME", "QWEN2_DIR_NAME", "CHECKPOINT_NAMES",
    "parse_hyperpyyaml", "load_model_config", "load_golden_config", "load_any_config", "load_qwen2_config",
    "qwen2_config_of", "model_revision", "model_yaml_text", "write_model_yaml", "strip_to_yaml",
    "add_source_defaults", "find_model_yaml",
]


def read_generated_marker(model_dir: Path) -> dict[str, Any] | None:
    """What the generator recorded (size, seed, ...) when `model_dir` holds random weights, else None."""
    path = Path(model_dir) / GENERATED_MARKER_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def random_weights_notice(model_dir: Path) -> str:
    """One plain sentence for users when `model_dir` holds generated random weights (empty otherwise): the
    stack, its log, /v1/models and the playground all show this text."""
    marker = read_generated_marker(model_dir)
    if marker is None:
        return ""
    return (f"RANDOM WEIGHTS: the model {Path(model_dir).name} is a generated {marker.get('size', '')} model, not "
            "the released CosyVoice2-0.5B, so every voice sounds like noise or babble, not speech. For real speech: "
            "`make download`, then `make up MODEL_DIR=models/cosyvoice2-0.5b`.")
