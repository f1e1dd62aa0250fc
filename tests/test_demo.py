from softtriple import demo
from softtriple.cli import main


def test_demo_training_improves_map_at_r_on_unseen_digits():
    results = demo.run()
    assert set(results) == {"raw pixels", "before", "after"}
    assert results["after"]["map_at_r"] > results["before"]["map_at_r"] + 0.01
    assert results["after"]["recall@1"] > results["before"]["recall@1"]


def test_cli_help_lists_demo(capsys):
    try:
        main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0
    assert "demo" in capsys.readouterr().out
