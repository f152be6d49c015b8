"""Every command's --help: a whole-sentence description, every default, the --set/--fix keys and
the budget in one sentence (issue 28, finding 3)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io

import pytest

from dsdm.cli import HelpFormatter

SWEEPS = ["components", "cross_arch", "fidelity", "figures", "lambdas", "methods", "model_count",
          "pretrain_epochs", "speech"]


def dsdm_parsers():
    from dsdm.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [("python -m dsdm", parser), *[(f"python -m dsdm {n}", p) for n, p in sub.choices.items()]]


def sweep_help(module: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(f"ablations.{module}").main(["--help"])
    return out.getvalue()


def search_parser():
    from tune.search import build_parser

    return build_parser()


def missing_defaults(parser: argparse.ArgumentParser) -> list[str]:
    formatter = HelpFormatter(parser.prog)
    return [a.option_strings[0] for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            and not a.required and "default" not in (formatter._get_help_string(a) or "").lower()]


def first_paragraph(text: str) -> str:
    return " ".join(text.split("\n\n")[0].split())


@pytest.mark.parametrize("prog,parser", [("python -m tune.search", search_parser()), *dsdm_parsers()])
def test_description_sentence_and_every_default(prog, parser):
    description = first_paragraph(parser.description or "")
    assert len(description.split()) >= 8 and description.endswith("."), (prog, description)
    assert missing_defaults(parser) == [], prog
    if any("--budget" in a.option_strings for a in parser._actions):
        assert "leaving --budget out means paper" in " ".join(parser.format_help().split())
    if any("--set" in a.option_strings for a in parser._actions):
        text = parser.format_help()
        assert "config keys for --set SECTION.KEY=VALUE" in text and "lr_img=" in text and "  eval: " in text


def test_search_help_lists_the_fix_keys():
    text = search_parser().format_help()
    assert "searched keys for --fix: lambda1" in text and "E or epochs" in text


@pytest.mark.parametrize("module", SWEEPS)
def test_sweep_help(module):
    text = sweep_help(module)
    description = first_paragraph(text.split("\n\n", 1)[1])
    assert description.endswith(".") and "python -m" not in description, description
    flat = " ".join(text.split())
    assert "leaving --budget out means paper" in flat and "config keys for --set" in text and "lr_img=" in text


def test_sweep_flags_show_their_defaults(monkeypatch):
    """The sweeps' parsers as their main() builds them: every optional flag says its default."""
    import ablations.cli as cli

    seen = []

    def capture(run, parser, argv=None):
        seen.append(parser)
        return 0

    for module in SWEEPS:
        mod = importlib.import_module(f"ablations.{module}")
        monkeypatch.setattr(mod, "cli", capture, raising=False)
        monkeypatch.setattr(cli, "cli", capture)
        mod.main([])
    assert len(seen) == len(SWEEPS)
    assert {p.prog: missing_defaults(p) for p in seen} == {p.prog: [] for p in seen}
