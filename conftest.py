"""Root pytest plugin: real-process fixtures (tiny_model_dir, redis_server, stage_servers, stack) for every test,
and the CI skip gate: with `--strict-skips` the session fails when a test skips for a reason outside
SKIP_ALLOWLIST, so a new silent skip turns CI red (`.ci/run` passes it, with `-ra` to print every reason)."""
import re

import pytest

pytest_plugins = ["cosyvoice_tools.testing"]

# The only reasons CI may skip for: hardware or an interpreter the CI machine does not have.
SKIP_ALLOWLIST = (
    re.compile(r"needs a CUDA device|no CUDA device"),
    re.compile(r"no Python 3\.12 interpreter"),
)


def pytest_addoption(parser):
    parser.addoption("--strict-skips", action="store_true",
                     help="fail the session when a test skips for a reason outside conftest.SKIP_ALLOWLIST")


class SkipGate:
    def __init__(self) -> None:
        self.unallowed: list[tuple[str, str]] = []

    def _note(self, report) -> None:
        # an xfail is reported as skipped too (wasxfail): an expected failure is not a skip
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        longrepr = report.longrepr
        reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not any(p.search(reason) for p in SKIP_ALLOWLIST):
            self.unallowed.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report):
        self._note(report)

    def pytest_collectreport(self, report):   # a module-level skip
        self._note(report)

    def pytest_terminal_summary(self, terminalreporter):
        if self.unallowed:
            terminalreporter.section("skips outside the allowlist (conftest.SKIP_ALLOWLIST)", red=True)
            for nodeid, reason in self.unallowed:
                terminalreporter.write_line(f"SKIP-NOT-ALLOWED {nodeid}: {reason}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.unallowed and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    if config.getoption("--strict-skips"):
        config.pluginmanager.register(SkipGate(), "skip-gate")
