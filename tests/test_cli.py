"""The console script, run as a real subprocess."""

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "migrated", *args], capture_output=True, text=True, timeout=120)


def test_bench_json_reports_ratios_to_memcmp():
    r = run("bench", "--json", "--size", "4", "--repeat", "1", "--parts", "core")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)["core"]
    ops = {(row["op"], row["workload"]) for row in result["rows"]}
    assert ("memcmp", "-") in ops and ("encode", "seed") in ops and ("scan", "unchanged") in ops
    memcmp = next(row for row in result["rows"] if row["op"] == "memcmp")
    assert memcmp["ratio"] == 1.0
    assert all(row["mbps"] > 0 for row in result["rows"])


def test_usage_errors_exit_2():
    assert run("bench", "--size", "0").returncode == 2
    assert run("nonsense").returncode == 2
    assert "bench" in run("--help").stdout


def test_max_throttle_out_of_range_is_a_usage_error_naming_the_range():
    base = ("send", "--source", "pid:1", "--to", "127.0.0.1:9", "--name", "x", "--auto-converge")
    r = run(*base, "--max-throttle", "150%")
    assert r.returncode == 2 and "0 to 0.99" in r.stderr
    assert run(*base, "--max-throttle", "lots").returncode == 2
    assert "--auto-converge" in run("send", "--help").stdout
