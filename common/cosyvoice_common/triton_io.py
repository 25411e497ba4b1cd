"""What the stages' Triton Python-backend models (`model_repository/<model>/1/model.py`) share:
tensor conversion, typed config.pbtxt parameters, error responses, per-request failure isolation.

Importable without Triton: the functions that need `triton_python_backend_utils` import it when called
(it exists only inside the backend's stub process).

Tensors cross the stub by DLPack both ways, never `pb_utils.Tensor(name, ndarray)` / `tensor.as_numpy()`:
with numpy >= 2 the tritonserver wheel's stub reads numpy outputs as 0 bytes and builds input arrays with
zero strides (every element reads as the first one). See ../shared/notes/TRITON.md.

torch is optional: the gateway image (the seed fronts' tritonserver) has none. Without torch the tensors
take the stub's numpy path, which is exact with numpy < 2 (that image pins it) and refused with numpy >= 2.
numpy's own DLPack is no way round it: `np.from_dlpack(pb_utils.Tensor)` kills the wheel's stub.
BYTES tensors have no DLPack form at all; their callers read them with `as_numpy()` under numpy < 2.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence, Set as AbstractSet
from typing import Any, TypeVar

import numpy as np

from cosyvoice_common.errors import InvalidRequestError

try:
    import torch
except ImportError:          # gateway image: numpy path below (numpy < 2 only)
    torch = None

DTYPES: dict[str, Any] = ({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
                          if torch is not None else {})

T = TypeVar("T")
K = TypeVar("K")
X = TypeVar("X")
Y = TypeVar("Y")


def _require_numpy_path() -> None:
    if int(np.__version__.split(".", 1)[0]) >= 2:
        raise RuntimeError(f"no torch and numpy {np.__version__}: the Triton stub's numpy path is wrong under "
                           "numpy >= 2; install torch or numpy<2")


def from_triton(tensor) -> np.ndarray:
    """A pb_utils.Tensor (input) -> a numpy array that outlives the request's shared memory."""
    if torch is None:
        _require_numpy_path()
        return np.array(tensor.as_numpy(), copy=True)
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).numpy().copy()


def unbatched_inputs(request, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named inputs of one request to a model with max_batch_size > 0, its batch dimension dropped (a request
    is one item: [1, ...]); absent inputs are left out. Raises InvalidRequestError for a batch of several."""
    import triton_python_backend_utils as pb_utils

    arrays = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            continue
        array = from_triton(tensor)
        if array.ndim == 0 or array.shape[0] != 1:
            raise InvalidRequestError(f"{name}: one item per request, got shape {list(array.shape)}")
        arrays[name] = array[0]
    return arrays


def to_triton(name: str, value: "np.ndarray | torch.Tensor"):
    """An output pb_utils.Tensor from a numpy array or a torch tensor (any device; dtype kept as is)."""
    import triton_python_backend_utils as pb_utils

    if torch is None:
        _require_numpy_path()
        return pb_utils.Tensor(name, np.ascontiguousarray(value))
    tensor = value.detach().cpu().contiguous() if isinstance(value, torch.Tensor) else \
        torch.from_numpy(np.ascontiguousarray(value))
    if tensor.numel() == 0:
        # The stub's DLPack check rejects most zero-size strides (torch.zeros((1, 80, 0)) included) as
        # "not contiguous". The numpy path's bug (0 bytes) is the right payload for an empty tensor.
        return pb_utils.Tensor(name, np.zeros(tuple(tensor.shape), tensor.numpy().dtype))
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor))


def get_parameter(model_config: Mapping[str, Any], name: str, pytype: Callable[[str], T] = str) -> T:
    """`parameters { key: name }` of config.pbtxt as `pytype`; missing or an unfilled `${...}` template is an error."""
    value = model_config.get("parameters", {}).get(name, {}).get("string_value")
    if value is None or value.startswith("${"):
        raise ValueError(f"config.pbtxt parameter {name!r} is not set (got {value!r})")
    return pytype(value)


def get_dtype(model_config: Mapping[str, Any], name: str, auto: str) -> "torch.dtype":
    """A dtype parameter (one of DTYPES, or "auto" which means `auto`: each stage says what auto is)."""
    if torch is None:
        raise RuntimeError(f"{name}: torch dtypes need torch, which is not installed")
    dtype_name = get_parameter(model_config, name)
    dtype_name = auto if dtype_name == "auto" else dtype_name
    if dtype_name not in DTYPES:
        raise ValueError(f"{name} must be auto or one of {list(DTYPES)}, got {dtype_name!r}")
    return DTYPES[dtype_name]


def send_outputs(sender, outputs: Mapping[str, Any], requested: AbstractSet[str] | None = None, flags: int = 0) -> None:
    """Sends one response of a decoupled model holding `outputs`, only those named in `requested` when given
    (the request's `requested_output_names()`; an empty set means every output, as Triton reads it).

    Why not `sender.send(InferenceResponse([...]))` with every output: the stub of tritonserver 2.51
    (python_backend r24.10) drops the outputs a client did not ask for inside send(), after it released the
    GIL. If the response held the last reference to such a tensor, the tensor dies there, frees its Python
    objects with no thread state, and a Python >= 3.12 stub segfaults (python_backend #390 fixed it upstream;
    common/tests/test_triton_io_stub312.py shows it with the wheel's 3.12 stub). So the unrequested
    outputs are never built, and `tensors` keeps every sent tensor alive until send() has returned.
    """
    import triton_python_backend_utils as pb_utils

    tensors = [to_triton(name, value) for name, value in outputs.items() if not requested or name in requested]
    sender.send(pb_utils.InferenceResponse(tensors), flags=flags)
    del tensors   # released only here, after send() returned


def error_response(exc: BaseException):
    """An InferenceResponse carrying only this error (the exception's type and message)."""
    import triton_python_backend_utils as pb_utils

    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))


def batch_or_each(fn: Callable[[list[X]], Sequence[Y]], items: Mapping[K, X]) -> dict[K, Y | Exception]:
    """fn over all items in one call; if that fails, each item alone, so one bad item fails only its own key.

    fn maps a list of items to one result per item (a list, or an array whose rows are the results)."""
    if not items:
        return {}
    keys = list(items)
    try:
        return dict(zip(keys, fn([items[k] for k in keys]), strict=True))
    except Exception as exc:  # noqa: BLE001 - isolate the culprit below
        if len(keys) == 1:
            return {keys[0]: exc}
    results: dict[K, Y | Exception] = {}
    for k in keys:
        try:
            results[k] = fn([items[k]])[0]
        except Exception as exc:  # noqa: BLE001
            results[k] = exc
    return results
