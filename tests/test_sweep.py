"""sweep.py: the options that choose a run's configurations say what they sweep, from the presets themselves
(PRESETS[name].axes), and the scoring rules they offer are landmarks.py's. The sweep itself, through whole
runs: tests/test_evaluate.py and tests/test_robustness.py."""

import re

import pytest

import evaluate
import landmarks
import sweep
from policy import POLICIES, PRESETS, SWEEP_AXES


def option(name):
    """The argparse action of the option `name` in evaluate.py's parser."""
    (action,) = [a for a in evaluate.build_parser()._actions if name in a.option_strings]
    return action


@pytest.mark.parametrize("axis, name", sweep.SWEEP_OPTIONS)
def test_a_sweep_option_names_exactly_the_methods_that_take_its_axis(axis, name):
    text = option(name).help
    named = {m for m in POLICIES if re.search(rf"\b{m}\b", text)}
    takers = {m for m in POLICIES if axis in PRESETS[m].axes}
    assert takers and named == takers, f"{name}: {text}"


def test_every_sweep_axis_but_the_budget_has_its_option():
    assert sorted(axis for axis, _ in sweep.SWEEP_OPTIONS) == sorted(set(SWEEP_AXES) - {"budget"})


def test_the_score_rule_choices_are_landmarks_rules():
    assert tuple(option("--score-rule").choices) == landmarks.SCORE_RULES
    for rule in landmarks.SCORE_RULES:  # each rule a preset uses is named in the help, with its presets
        users = [m for m in POLICIES if PRESETS[m].sparse and PRESETS[m].select.score_rule == rule]
        assert not users or rule in option("--score-rule").help, rule
