"""Every console script: installed, `--help` works, every option shows its default once and
every argument is documented."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os

import pytest
from helpers.common import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    tomllib = None



def declared_scripts() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


SCRIPTS = declared_scripts()


def test_console_scripts_are_installed():
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
                 if e.name.startswith("tempo-vae-")}
    assert installed == SCRIPTS, "reinstall with pip install -e '.[test]'"


class _Captured(Exception):
    pass


def parser_of(target: str, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser that ``module:function`` builds, taken at its parse_args call."""
    module, func = target.split(":")
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args",
                        lambda self, *a, **k: capture(self))
    with pytest.raises(_Captured):
        getattr(importlib.import_module(module), func)(["--help"])
    return seen["parser"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_documents_every_argument_and_default_once(name, monkeypatch, capsys):
    if name == "tempo-vae-launch":
        pytest.skip("takes the options of `accelerate launch`, documented by accelerate")
    parser = parser_of(SCRIPTS[name], monkeypatch)
    fmt = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        text = fmt._expand_help(action) if action.help else ""
        assert text.strip(), f"{name}: {label} has no help text"
        default = action.default
        if not action.option_strings or default is None or default is False \
                or default in ("", [], argparse.SUPPRESS) \
                or isinstance(action, argparse._StoreTrueAction):
            continue
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        count = text.count(f"default: {shown}") + text.count(f"default {shown}")
        assert count == 1, f"{name}: {label} shows its default {shown!r} {count} times: {text!r}"
