"""Option precedence: flag > HQ_* environment variable > config file > default."""

from __future__ import annotations

import os

import pytest

from hq import config, options

OPTIONS = [
    options.Option("bind", ["tcp://127.0.0.1:8686"], "endpoints", multiple=True),
    options.Option("heartbeat-interval", 0.5, "seconds", float),
    options.Option("workers", 2, "count", int),
    options.Option("read-only", False, "flag", options.BOOL),
    options.Option("log-level", "INFO", "level", choices=("DEBUG", "INFO")),
]

DAEMONS = [
    ("hq-broker", options.BROKER),
    ("hq-worker", options.WORKER),
    ("hq-server", options.SERVER),
    ("hq-gateway", options.GATEWAY),
]


def parse(argv=(), environ=None, prog="hq-test", options=OPTIONS):
    return config.parse(prog, "test", options, list(argv), environ or {})


def write(tmp_path, text: str, name: str = "hq.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def fails(capsys, *args, **kwargs) -> str:
    """Run parse, expect exit status 2, return the one-line error message."""
    with pytest.raises(SystemExit) as exc:
        parse(*args, **kwargs)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


# --- precedence ----------------------------------------------------------------------------


def test_defaults_when_nothing_is_set():
    opts = parse()
    assert opts.bind == ["tcp://127.0.0.1:8686"]
    assert opts.heartbeat_interval == 0.5
    assert opts.workers == 2
    assert opts.read_only is False
    assert opts.config is None


def test_file_beats_default(tmp_path):
    path = write(tmp_path, "[hq]\nworkers = 5\nheartbeat_interval = 0.25\nread-only = yes\n")
    opts = parse(["--config", path])
    assert (opts.workers, opts.heartbeat_interval, opts.read_only) == (5, 0.25, True)
    assert opts.config == path


def test_env_beats_file(tmp_path):
    path = write(tmp_path, "[hq]\nworkers = 5\nheartbeat-interval = 0.25\n")
    opts = parse(["--config", path], {"HQ_WORKERS": "7"})
    assert opts.workers == 7
    assert opts.heartbeat_interval == 0.25  # not in the environment: the file still counts


def test_flag_beats_env_and_file(tmp_path):
    path = write(tmp_path, "[hq]\nworkers = 5\n")
    opts = parse(["--config", path, "--workers", "9"], {"HQ_WORKERS": "7"})
    assert opts.workers == 9


def test_config_path_from_env(tmp_path):
    path = write(tmp_path, "[hq]\nworkers = 5\n")
    opts = parse([], {"HQ_CONFIG": path})
    assert opts.workers == 5
    assert opts.config == path


def test_config_flag_beats_config_env(tmp_path):
    first = write(tmp_path, "[hq]\nworkers = 5\n", "first.conf")
    second = write(tmp_path, "[hq]\nworkers = 6\n", "second.conf")
    assert parse(["--config", second], {"HQ_CONFIG": first}).workers == 6


def test_multiple_values_split_on_commas_everywhere(tmp_path):
    path = write(tmp_path, "[hq]\nbind = tcp://127.0.0.1:1, ipc:///tmp/a\n")
    assert parse(["--config", path]).bind == ["tcp://127.0.0.1:1", "ipc:///tmp/a"]
    from_env = parse([], {"HQ_BIND": "tcp://127.0.0.1:2,ipc:///tmp/b"})
    assert from_env.bind == ["tcp://127.0.0.1:2", "ipc:///tmp/b"]
    assert parse(["--bind", "tcp://127.0.0.1:3", "--bind", "ipc:///tmp/c,ipc:///tmp/d"]).bind == [
        "tcp://127.0.0.1:3",
        "ipc:///tmp/c",
        "ipc:///tmp/d",
    ]


# --- one file for several programs -----------------------------------------------------------


def test_program_section_beats_shared_section(tmp_path):
    path = write(tmp_path, "[hq]\nheartbeat-interval = 0.25\n[hq-broker]\nheartbeat-interval = 0.125\n")
    broker = config.parse("hq-broker", "t", options.BROKER, ["--config", path], {})
    worker = config.parse("hq-worker", "t", options.WORKER, ["--config", path], {})
    assert (broker.heartbeat_interval_s, worker.heartbeat_interval_s) == (0.125, 0.25)


def test_shared_section_holds_keys_of_every_program(tmp_path):
    """One [hq] section for the broker, the workers and hq-server: each takes its own keys."""
    path = write(
        tmp_path,
        "[hq]\nrequest-timeout = 3\ndb = /tmp/x.db\nworkers = 4\nheartbeat-interval = 0.25\n",
    )
    broker = config.parse("hq-broker", "t", options.BROKER, ["--config", path], {})
    worker = config.parse("hq-worker", "t", options.WORKER, ["--config", path], {})
    srv = config.parse("hq-server", "t", options.SERVER, ["--config", path], {})
    assert (broker.request_timeout_s, broker.heartbeat_interval_s) == (3.0, 0.25)
    assert (worker.db, worker.heartbeat_interval_s) == ("/tmp/x.db", 0.25)
    assert (srv.workers, srv.db) == (4, "/tmp/x.db")


def test_every_program_can_read_the_example_file():
    import pathlib

    example = pathlib.Path(__file__).resolve().parents[2] / "configs" / "hq.conf.example"
    for prog, rows in DAEMONS:
        opts = config.parse(prog, "t", rows, ["--config", str(example)], {})
        assert opts.config == str(example)


def test_example_file_names_every_option():
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[2] / "configs" / "hq.conf.example").read_text()
    for prog, rows in DAEMONS:
        if prog == "hq-server":
            continue
        for opt in rows:
            assert f"{opt.name} =" in text, f"{prog} option {opt.name} missing from hq.conf.example"


# --- errors exit 2 with one line -----------------------------------------------------------------


def test_bad_flag_value_exits_2(capsys):
    err = fails(capsys, ["--workers", "many"])
    assert "workers" in err and "command line" in err and "'many'" in err


def test_bad_env_value_exits_2_and_names_the_variable(capsys):
    err = fails(capsys, [], {"HQ_HEARTBEAT_INTERVAL": "soon"})
    assert "HQ_HEARTBEAT_INTERVAL" in err


def test_bad_file_value_exits_2_and_names_the_file(tmp_path, capsys):
    path = write(tmp_path, "[hq]\nread-only = maybe\n")
    err = fails(capsys, ["--config", path])
    assert path in err and "read-only" in err


def test_bad_choice_exits_2(capsys):
    assert "log-level" in fails(capsys, [], {"HQ_LOG_LEVEL": "LOUD"})
    assert "--log-level" in fails(capsys, ["--log-level", "LOUD"])


def test_only_the_winning_source_is_converted(tmp_path):
    """Only the winning source is converted: a bad file value under a good flag is ignored."""
    path = write(tmp_path, "[hq]\nworkers = many\n")
    assert parse(["--config", path, "--workers", "3"]).workers == 3


def test_unknown_flag_exits_2(capsys):
    assert "--nope" in fails(capsys, ["--nope"])


def test_unknown_key_in_shared_section_exits_2(tmp_path, capsys):
    path = write(tmp_path, "[hq]\nworkerz = 3\n")
    err = fails(capsys, ["--config", path])
    assert "workerz" in err and "[hq]" in err


def test_key_of_another_program_in_shared_section_is_accepted(tmp_path):
    path = write(tmp_path, "[hq]\nbusy-timeout = 100\nworkers = 3\n")  # busy-timeout: hq-worker only
    assert parse(["--config", path]).workers == 3


def test_key_of_another_program_in_program_section_exits_2(tmp_path, capsys):
    path = write(tmp_path, "[hq-broker]\nbusy-timeout = 100\n")
    with pytest.raises(SystemExit) as exc:
        config.parse("hq-broker", "t", options.BROKER, ["--config", path], {})
    assert exc.value.code == 2
    assert "busy-timeout" in capsys.readouterr().err


def test_other_programs_section_is_not_checked_against_this_program(tmp_path):
    path = write(tmp_path, "[hq-worker]\nbusy-timeout = 100\n")
    assert config.parse("hq-broker", "t", options.BROKER, ["--config", path], {}).request_timeout_s == 10.0


def test_unknown_section_exits_2(tmp_path, capsys):
    path = write(tmp_path, "[hq-borker]\nrequest-timeout = 3\n")
    assert "hq-borker" in fails(capsys, ["--config", path])


def test_missing_config_file_exits_2(tmp_path, capsys):
    missing = str(tmp_path / "missing.conf")
    assert missing in fails(capsys, [], {"HQ_CONFIG": missing})


def test_unparsable_config_file_exits_2(tmp_path, capsys):
    path = write(tmp_path, "workers = 3\n")  # no section header
    assert path in fails(capsys, ["--config", path])


def test_a_config_file_that_is_not_utf8_text_or_not_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "latin.conf").write_bytes(b"\xff\xfe[hq]\nworkers = 3\n")
    assert "not UTF-8 text" in fails(capsys, ["--config", str(tmp_path / "latin.conf")])
    os.mkfifo(tmp_path / "fifo.conf")  # read, it would wait for a writer forever
    assert "not a regular file" in fails(capsys, [], {"HQ_CONFIG": str(tmp_path / "fifo.conf")})


def test_percent_in_a_value_is_literal(tmp_path):
    opts = parse(["--config", write(tmp_path, "[hq]\nbind = ipc:///tmp/100%\n")])
    assert opts.bind == ["ipc:///tmp/100%"]


# --- --help names the variables ---------------------------------------------------------------


@pytest.mark.parametrize("prog,options", DAEMONS)
def test_help_names_each_environment_variable(prog, options, capsys):
    with pytest.raises(SystemExit) as exc:
        config.parse(prog, "t", options, ["--help"], {})
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in [config.CONFIG_OPTION, *options]:
        assert opt.env in text, f"{prog} --help does not name {opt.env}"
