"""docs/CONFIGURATION.md is what the configuration classes generate, and lists every variable they read."""
from __future__ import annotations

from cosyvoice_common.settings import variables
from cosyvoice_common.stage_params import STAGE_PARAMS
from cosyvoice_common.stages import stage
from cosyvoice_tools import config_docs


def test_committed_configuration_table_is_up_to_date():
    assert config_docs.DOC_PATH.read_text() == config_docs.render(), "run `make config-docs` and commit the result"


def test_check_mode_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "CONFIGURATION.md"
    stale.write_text(config_docs.render().replace("GRPC_PORT", "GRPC_PORTS"))
    assert config_docs.main(["--check", "--out", str(stale)]) == 1
    assert config_docs.main(["--out", str(stale)]) == 0 and config_docs.main(["--check", "--out", str(stale)]) == 0


def test_every_stage_setting_and_gateway_variable_has_a_row():
    table = config_docs.render()
    for name, cls in STAGE_PARAMS.items():
        own = [v for v in variables(cls, stage(name).env("")) if not v.endswith(("_MAX_BATCH_SIZE", "_QUEUE_DELAY_US"))]
        assert all(f"| `{v}` | {name} stage |" in table for v in own), name
    from cosyvoice_gateway.server import GatewayConfig
    assert all(f"| `{v}` | gateway |" in table for v in variables(GatewayConfig))
