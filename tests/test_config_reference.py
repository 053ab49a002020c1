"""The key reference (docs/config-reference.md) is generated from the stage schemas and current, and
each stage's --help shows overrides of its own keys (issue 19)."""

from __future__ import annotations

import pytest

from biomask import config_reference
from biomask.cli import OVERRIDE_EXAMPLES, main
from biomask.stages import STAGES


def test_the_committed_reference_matches_the_schemas(repo):
    committed = (repo / config_reference.DEFAULT_OUTPUT).read_text()
    assert committed == config_reference.render(), "stale: run `biomask config-reference` and commit it"


def test_the_reference_lists_keys_with_defaults_and_their_line():
    text = config_reference.render()
    assert '| `labels.missing` | "error" \\| "drop" | `"error"` | cells without a label |' in text
    assert "`train.report_to`" in text and "`evaluations.<name>.metric`" in text
    for stage in STAGES.values():
        assert f"## `biomask {stage.name}`" in text


@pytest.mark.parametrize("stage", sorted(OVERRIDE_EXAMPLES))
def test_help_shows_overrides_of_the_stages_own_keys(stage, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # argparse wraps at the terminal width (and inside paths)
    keys = {row[0] for row in config_reference.rows(STAGES[stage].config_class())}
    example = OVERRIDE_EXAMPLES[stage]
    for override in example.split():
        assert override.split("=", 1)[0] in keys, override
    with pytest.raises(SystemExit):
        main([*stage.split(), "--help"])
    shown = capsys.readouterr().out
    assert f"e.g. {example}" in shown and "docs/config-reference.md" in shown


def test_a_stage_without_an_override_example_still_gets_its_command(monkeypatch):
    """A new stage needs no OVERRIDE_EXAMPLES entry: a missing one was a KeyError while building the
    parser, so every biomask command failed until it was added."""
    import argparse

    from biomask.cli import _add_stage_arguments

    monkeypatch.delitem(OVERRIDE_EXAMPLES, "evaluate")
    parser = argparse.ArgumentParser()
    _add_stage_arguments(parser, "evaluate")
    assert "override config keys" in parser.format_help()
    assert parser.parse_args(["-c", "x.yaml", "seeds=[0]"]).overrides == ["seeds=[0]"]


def test_quiet_works_after_the_subcommand(tmp_path, capsys):
    assert main(["config-reference", "--output", str(tmp_path / "ref.md"), "-q"]) == 0
    assert "wrote" not in capsys.readouterr().err
    assert main(["config-reference", "--output", str(tmp_path / "ref.md")]) == 0
    assert "wrote" in capsys.readouterr().err
