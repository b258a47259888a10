"""The benchmarks' shared helpers (bench/report.py, bench/launch.py) and the load benchmark's pure parts:
what every table's numbers go through, checked without starting anything."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from bench.launch import config_args, demo_config, http_base
from bench.load_client import delta_samples, playback
from bench.load_procs import process_name
from bench.load_report import HEADER, table
from bench.report import StreamedTable, cpu_probe_ms, machine_line, markdown, ms, pct_ms, quantile
from csm.audio import SAMPLE_RATE


def test_quantile_edges():
    assert quantile([], 50) is None
    assert quantile(np.array([]), 95) is None
    assert quantile([0.3], 0) == quantile([0.3], 100) == pytest.approx(0.3)
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert quantile(values, 0) == 1.0 and quantile(values, 100) == 4.0
    assert quantile(values, 50) == pytest.approx(2.5)  # linear between the middle two
    assert quantile(values, 95) == pytest.approx(3.85)


def test_ms_cells():
    assert ms(None) == "-"
    assert ms(0.2494) == "249" and ms(0.0) == "0"
    assert pct_ms([], 50) == "-"
    assert pct_ms([0.1, 0.3], 50) == "200"


def test_markdown_pads_and_aligns():
    text = markdown(["n", "note"], [["1", "ok"], ["100", "a longer note"]], left={1})
    lines = text.splitlines()
    assert lines[0] == "|   n | note          |"
    assert lines[1] == "|----:|:--------------|"
    assert lines[2] == "|   1 | ok            |"
    assert lines[3] == "| 100 | a longer note |"
    assert len({len(line) for line in lines}) == 1  # reads the same raw and rendered


def test_markdown_rejects_a_row_of_the_wrong_length():
    with pytest.raises(ValueError):
        markdown(["a", "b"], [["1"]])


def test_streamed_table_prints_as_it_goes(capsys):
    t = StreamedTable((("run", 5), ("ms", 4)))
    assert capsys.readouterr().out.splitlines() == ["| run   | ms   |", "|-------|------|"]
    t.row(["a", "1.5"])
    t.row(["longer run", "2"])  # a long cell widens its own row only
    assert capsys.readouterr().out.splitlines() == ["| a     | 1.5  |", "| longer run | 2    |"]


def test_every_report_says_how_fast_a_core_ran():
    assert 0 < cpu_probe_ms(rounds=1) < 10_000
    assert re.fullmatch(r"# machine: .+, \d+ cores; .+; cpu probe \d+\.\d ms \(.+\)", machine_line())


def test_load_table_keeps_its_columns():
    row = ["1", "3", "100 / 200 / 300", "600 / 700", "3", "0", "-", "0", "10 / 12 / 11", "+0", "none"]
    lines = table([row]).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == HEADER
    assert lines[1].endswith(":" + "-" * (len("errors") + 1) + "|")  # the errors column, text, left-aligned


def test_demo_config_is_serve_config_with_our_settings():
    config = demo_config(8123, "/tmp/h", None, 4, asr="end-of-turn", recognizers=2)
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    ingress = config_args(config)["ingress"]
    assert ingress["history_dir"] == "/tmp/h" and ingress["max_conversations"] == 4
    assert ingress["allow_anonymous"] is True and "token" not in ingress
    assert ingress["streaming_asr"] is False
    (app,) = config["applications"]
    (recognizer,) = [d for d in app["deployments"] if d["name"] == "SpeechRecognizer"]
    assert recognizer["num_replicas"] == 2
    assert any(d["name"] == "CSMGenerator" for d in app["deployments"])  # the file's options are kept


def test_demo_config_defaults_and_token():
    config = demo_config(8124, "/tmp/h", "s3cret", None)
    ingress = config_args(config)["ingress"]
    assert ingress["token"] == "s3cret" and "allow_anonymous" not in ingress
    assert ingress["streaming_asr"] is True
    assert ingress["max_conversations"] == 16  # serve_config.yaml's
    (app,) = config["applications"]
    (recognizer,) = [d for d in app["deployments"] if d["name"] == "SpeechRecognizer"]
    assert "num_replicas" not in recognizer


def test_http_base():
    assert http_base("ws://127.0.0.1:8000/v1/realtime?token=x") == "http://127.0.0.1:8000"
    assert http_base("wss://localhost:9/v1/realtime") == "https://localhost:9"


def test_delta_samples_counts_without_decoding():
    for n in (0, 1, 2, 3, 1919, 1920):
        b64 = base64.b64encode(np.zeros(n, np.int16).tobytes()).decode()
        assert delta_samples(b64) == n


def test_playback_preroll_and_stalls():
    frame = SAMPLE_RATE // 10  # 100 ms per delta
    # Two deltas at once reach the 120 ms pre-roll: playback starts at t=0 and runs dry at 0.2 s;
    # the third delta comes at 0.5 s, a 0.3 s stall 0.2 s into the reply.
    ends, stalls = playback([(0.0, frame), (0.0, frame), (0.5, frame)])
    assert ends == pytest.approx(0.6)
    assert [(s.at_s, s.seconds) for s in stalls] == [pytest.approx((0.2, 0.3))]
    # Shorter than the pre-roll: it plays once the reply is complete.
    ends, stalls = playback([(0.0, frame)], complete_at=1.0)
    assert ends == pytest.approx(1.1) and stalls == []


def test_process_name():
    assert process_name("ray::ServeReplica:csm:CSMGenerator.handle_request x") == "CSMGenerator"
    assert process_name("/usr/bin/python3 bench/load.py --people 1") == "load.py"
    assert process_name("") == "?"
