"""The fuzz targets in the normal suite: every input in the corpus
(tests/fuzz/corpus: the seeds, and every input a fuzz run found failing),
a seeded random run of each target, and a short coverage-guided run of
each under atheris (``make fuzz`` runs longer, and replays what it found
under AddressSanitizer and UBSan)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_targets import TARGETS, replay

HERE = Path(__file__).parent
CORPUS = HERE / "fuzz" / "corpus"
ATHERIS_RUNS = 15_000  # per target: a few seconds each here


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_corpus_replays_without_a_failure(target):
    files = [f for f in (CORPUS / target).iterdir() if f.is_file()]
    assert files, f"no corpus for {target}"
    assert replay([CORPUS / target]) == len(files)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_random_inputs_and_mutated_corpus_inputs_fail_only_with_migrated_errors(target):
    rng = random.Random(target)
    seeds = [f.read_bytes() for f in (CORPUS / target).iterdir() if f.is_file()]
    for _ in range(1500):
        data = bytearray(rng.choice(seeds) if seeds and rng.random() < 0.5 else rng.randbytes(rng.randrange(600)))
        for _ in range(rng.randrange(4)):  # flip, insert or cut bytes of a seed
            if data:
                at = rng.randrange(len(data))
                data[at : at + rng.randrange(3)] = rng.randbytes(rng.randrange(3))
        TARGETS[target](bytes(data))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_short_coverage_guided_run_finds_nothing(target):
    pytest.importorskip("atheris", reason="atheris (a test dependency) is not installed")
    r = subprocess.run(
        [sys.executable, str(HERE / "fuzz_run.py"), target, f"-runs={ATHERIS_RUNS}", "-print_final_stats=1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=HERE,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Done {ATHERIS_RUNS} runs" in r.stderr
    assert " cov: " in r.stderr  # coverage-guided: it saw the code it reached
