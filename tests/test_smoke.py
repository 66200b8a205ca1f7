from click.testing import CliRunner


def test_cli_help():
    from cocoa.cli.data import cli

    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "inspect" in r.output
