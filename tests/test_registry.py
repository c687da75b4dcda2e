"""One table per kind of named thing: `compress-order list` and the 'valid: ...' of an error read the same one."""

from __future__ import annotations

from hydra.utils import get_class

from compress_order.cli import main as cli
from compress_order.cli.analysis import HANDLERS
from compress_order.core.paths import group_options
from compress_order.config.stages import declared_defaults, stage_defaults
from compress_order.core.registry import config_group, stage_files
from compress_order.stages.base import Stage


def test_the_stage_table_is_the_conf_stage_folder_with_each_yamls_class():
    assert list(stage_files()) == group_options("stage")
    for name, entry in stage_files().items():
        assert entry.path == config_group("stage")[name] and issubclass(get_class(entry.target), Stage)


def test_list_and_the_unknown_stage_error_read_the_stage_table(capsys):
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out.split("stage:\n", 1)[1].split("backends")[0]
    assert [line.split()[0] for line in listed.splitlines()] == list(stage_files())
    assert cli.main(["validate", "stages=[nope]"]) == 2
    assert capsys.readouterr().err.strip().endswith("valid stages: " + ", ".join(stage_files()))


def test_list_reads_each_stages_defaults_from_its_source_as_importing_it_would():
    for entry in stage_files().values():
        declared = declared_defaults(entry.target)
        assert declared is not None, entry.target  # else `list` imports the stage (and torch)
        assert list(declared.items()) == list(stage_defaults(entry.target).items()), entry.target
    assert declared_defaults("torch.nn.Linear") is None  # outside the package: import it instead


def test_the_cli_dispatches_every_analysis_command_and_only_those():
    assert set(cli.ANALYSIS_COMMANDS) == set(HANDLERS)
