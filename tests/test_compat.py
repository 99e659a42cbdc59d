"""A stack of packages known to fail is named in one line, before any traceback from inside them."""

from __future__ import annotations

from packaging.version import Version

from sdlora import cli, compat


def _versions(**given: str | None) -> dict[str, Version | None]:
    return {name: Version(v) if v else None for name, v in given.items()}


def test_transformers_524_with_peft_021_is_named_with_the_fix():
    problems = compat.stack_problems(_versions(transformers="5.24.0", peft="0.21.2"))
    assert len(problems) == 1
    line = problems[0]
    assert "transformers 5.24.0" in line and "peft 0.21.2" in line
    assert "pip install -c requirements.lock" in line and "transformers<5.24" in line
    assert "\n" not in line


def test_tested_and_future_combinations_pass():
    assert compat.stack_problems(_versions(transformers="5.23.0", peft="0.21.2")) == []
    assert compat.stack_problems(_versions(transformers="5.24.0", peft="0.22.0")) == []
    assert compat.stack_problems(_versions(transformers="5.24.0", peft=None)) == []


def test_installed_stack_fits():
    assert compat.stack_problems() == []


def test_every_command_refuses_a_bad_stack_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(
        compat, "installed_versions", lambda names: _versions(transformers="5.24.0", peft="0.21.0")
    )
    code = cli.main(["inspect", str(tmp_path / "missing.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("sdlora: error: transformers 5.24.0 does not work with peft 0.21.0")
    assert "Traceback" not in err and len(err.splitlines()) == 1
