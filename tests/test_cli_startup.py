"""The CLI starts without torch: `difftrain --help`, `recipes` and every `COMMAND --help` answer at once."""

import subprocess
import sys

from difftrain import cli
from difftrain.checkpoint import CheckpointError
from difftrain.config import ConfigError
from difftrain.data import DataError
from difftrain.evaluation import EvaluationError
from difftrain.samplers import SPACINGS
from difftrain.training import TrainingError


def test_importing_the_cli_and_building_its_parser_leaves_torch_unimported():
    code = ("import sys, difftrain, difftrain.config, difftrain.registry, difftrain.cli; "
            "difftrain.cli.build_parser(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_written_out_choices_match_the_sampler_tables():
    assert tuple(cli.SPACING_NAMES) == tuple(SPACINGS)
    assert not hasattr(cli, "SAMPLER_NAMES")  # --sampler is checked by samplers.SAMPLERS: a new sampler is one line


def test_the_cli_still_turns_every_library_error_into_a_message():
    assert set(cli._error_types()) >= {ConfigError, CheckpointError, DataError, TrainingError, EvaluationError}
