"""CUDA MPS switch of the launcher (the daemon itself needs a GPU machine: tools/gpu/final_run.sh runs it)."""
import pytest
from cosyvoice_launcher import mps
from cosyvoice_launcher.mps import MpsDaemon, MpsError
from cosyvoice_launcher.stack import StackConfig


def test_mps_mode_is_read_from_the_environment_and_validated():
    assert StackConfig.from_env({}).cuda_mps == "off"
    assert StackConfig.from_env({"STACK_CUDA_MPS": "auto"}).cuda_mps == "auto"
    with pytest.raises(ValueError, match="STACK_CUDA_MPS"):
        mps.wanted("sometimes", True)


def test_mps_is_never_used_without_a_cuda_stage_or_when_off():
    assert not mps.wanted("on", uses_cuda=False)
    assert not mps.wanted("auto", uses_cuda=False)
    assert not mps.wanted("off", uses_cuda=True)


@pytest.mark.skipif(mps.control_binary() is not None, reason="this machine has the MPS control daemon")
def test_mps_auto_falls_back_and_on_fails_clearly_without_the_daemon(tmp_path):
    assert not mps.wanted("auto", uses_cuda=True)
    assert mps.wanted("on", uses_cuda=True)
    with pytest.raises(MpsError, match=mps.CONTROL_BINARY):
        MpsDaemon(tmp_path / "mps").start()
    assert not MpsDaemon(tmp_path / "mps").stop()


def test_every_client_gets_the_daemons_pipe_and_log_folders(tmp_path):
    env = MpsDaemon(tmp_path / "mps").env()
    assert env == {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps" / "pipe"),
                   "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "mps" / "log")}
