"""Wrong command-line input ends with argparse's one-line error (exit 2), never a traceback or a started stack."""
import pytest

from exporter.__main__ import main

WRONG = [
    (["report", "--prometheus", "http://127.0.0.1:1", "--run", "r", "--since", "banana"], "--since"),
    (["report", "--prometheus", "localhost:9090", "--run", "r"], "--prometheus"),
    (["demo", "--eval-every", "0"], "--eval-every"),
    (["demo", "--port", "70000"], "--port"),
    (["demo", "--port", "abc"], "--port"),
    (["demo", "--steps", "-1"], "--steps"),
    (["demo", "--step-time", "-3"], "--step-time"),
    (["demo", "--max-window", "0"], "--max-window"),
    (["stack", "--duration", "-5"], "--duration"),
    (["stack", "--steps", "0"], "--steps"),
]


@pytest.mark.parametrize("argv,option", WRONG, ids=[" ".join(a) for a, _ in WRONG])
def test_wrong_input_is_refused_with_one_line_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m exporter {argv[0]}: error: argument {option}"), err
    assert "Traceback" not in "\n".join(err)


def test_a_valid_duration_and_url_pass_the_parser():
    from exporter.__main__ import build_parser

    args = build_parser().parse_args(["report", "--prometheus", "https://prom.example:9090", "--run", "r",
                                      "--since", "1h30m"])
    assert (args.prometheus, args.since) == ("https://prom.example:9090", "1h30m")
