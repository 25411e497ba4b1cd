"""How the hostile suite spreads a load phase's workers over client processes (the GPU run's 160 workers in one
event loop measured the client, not the gateway)."""
from cosyvoice_tools import hostile


def test_one_client_process_per_twenty_workers_at_most_half_the_cores(monkeypatch):
    monkeypatch.setattr(hostile.os, "cpu_count", lambda: 16)
    assert [hostile.client_processes(w) for w in (2, 16, 20, 40, 160, 1000)] == [1, 1, 1, 2, 8, 8]
    monkeypatch.setattr(hostile.os, "cpu_count", lambda: 2)
    assert hostile.client_processes(160) == 1           # the 2-core CI machine: the client stays in one process
    monkeypatch.setattr(hostile.os, "cpu_count", lambda: None)
    assert hostile.client_processes(160) == 1


def test_a_requested_count_is_kept_within_one_worker_per_process():
    assert hostile.client_processes(20, requested=4) == 4
    assert hostile.client_processes(3, requested=8) == 3
    assert hostile.client_processes(3, requested=0) >= 1


def test_negative_client_processes_is_refused(capsys):
    import pytest
    with pytest.raises(SystemExit):
        hostile.parse_args(["--client-processes", "-1"])
    assert "client-processes" in capsys.readouterr().err
