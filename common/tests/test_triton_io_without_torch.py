"""cosyvoice_common.triton_io without torch (the gateway image, where the seed fronts run): tensors take the
stub's numpy path, which is exact only under numpy < 2, and the helpers say so instead of corrupting data."""
import sys
import types

import numpy as np
import pytest

from cosyvoice_common import triton_io


class FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array

    def to_dlpack(self):
        raise AssertionError("numpy path must not use DLPack")


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.setattr(triton_io, "torch", None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.SimpleNamespace(Tensor=FakeTensor))


def test_inputs_and_outputs_take_the_numpy_path_under_numpy_1(no_torch, monkeypatch):
    monkeypatch.setattr(np, "__version__", "1.26.4")
    shared = np.arange(4, dtype=np.float32).reshape(1, 4)
    got = triton_io.from_triton(FakeTensor("x", shared))
    assert np.array_equal(got, shared) and not np.shares_memory(got, shared)   # outlives the request
    out = triton_io.to_triton("waveform", np.asfortranarray(np.ones((2, 3), np.float32)))
    assert out.name == "waveform" and out.array.flags.c_contiguous and out.array.dtype == np.float32
    empty = triton_io.to_triton("waveform", np.zeros((1, 0), np.float32))
    assert empty.array.shape == (1, 0)


def test_numpy_2_without_torch_is_refused_not_corrupted(no_torch, monkeypatch):
    monkeypatch.setattr(np, "__version__", "2.1.0")
    with pytest.raises(RuntimeError, match="numpy<2"):
        triton_io.from_triton(FakeTensor("x", np.zeros(3, np.float32)))
    with pytest.raises(RuntimeError, match="numpy<2"):
        triton_io.to_triton("y", np.zeros(3, np.float32))


def test_torch_dtypes_need_torch(no_torch):
    with pytest.raises(RuntimeError, match="torch"):
        triton_io.get_dtype({"parameters": {"dtype": {"string_value": "float32"}}}, "dtype", "float32")
