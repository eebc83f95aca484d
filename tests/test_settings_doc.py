"""The settings reference is generated from the settings model, and the committed one is current."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from scheduler.cli import main
from scheduler.core.settings import ENV_VARS, FarmSettings
from scheduler.core.settings_doc import DOC_PATH, render_settings_doc, settings_rows

REPO = Path(__file__).resolve().parents[1]


def test_committed_settings_reference_is_up_to_date() -> None:
    committed = (REPO / DOC_PATH).read_text()
    assert committed == render_settings_doc(), "docs/settings.md is stale: run `reelfarm settings-doc` and commit it"


def test_every_setting_is_described_and_every_env_var_names_a_setting() -> None:
    rows = settings_rows()
    undescribed = [r["name"] for r in rows if not r["description"]]
    assert undescribed == [], f"add a comment above these settings in their model: {undescribed}"
    names = {r["name"] for r in rows}
    assert {".".join(path) for path in ENV_VARS.values()} <= names
    # Sections are flattened: a nested default shows as its own row, with its real default.
    row = next(r for r in rows if r["name"] == "worker.shutdown_grace_seconds")
    assert row["default"] == f"`{FarmSettings().worker.shutdown_grace_seconds}`"
    assert next(r for r in rows if r["name"] == "redis_url")["env"] == "REELFARM_REDIS_URL"


def test_settings_doc_command_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "settings.md"
    runner = CliRunner()
    stale = runner.invoke(main, ["settings-doc", "--out", str(out), "--check"])
    assert stale.exit_code == 1 and "out of date" in stale.output
    assert runner.invoke(main, ["settings-doc", "--out", str(out)]).exit_code == 0
    assert out.read_text() == render_settings_doc()
    assert runner.invoke(main, ["settings-doc", "--out", str(out), "--check"]).exit_code == 0
