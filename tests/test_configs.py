"""Every shipped eval/paper config parses against the real CLI (classes, argument names, types)."""

from pathlib import Path

import pytest

from clipib.lit.cli import eval_cli

CONFIGS = sorted(str(p) for p in (Path(__file__).parent.parent / "configs").glob("*/*.yaml")
                 if p.parent.name in ("paper", "eval"))


@pytest.mark.parametrize("config", CONFIGS, ids=[Path(c).stem for c in CONFIGS])
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli(args=["test", "-c", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "methods:" in printed and "kind:" in printed


@pytest.mark.parametrize("config", CONFIGS, ids=[Path(c).stem for c in CONFIGS])
def test_config_names_are_registered(config):
    import yaml

    import clipib
    from clipib.metrics import METRICS

    model = yaml.safe_load(Path(config).read_text())["model"]
    for name, spec in model["methods"].items():
        assert (spec or {}).get("method", name) in clipib.METHODS, name
    assert set(model.get("metrics", {})) <= set(METRICS)
