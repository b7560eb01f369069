"""Coverage-guided fuzzing of the targets in fuzz_targets.py with atheris
(libFuzzer for Python): ``make fuzz``, and a bounded run in the suite.

    python tests/fuzz_run.py TARGET [libFuzzer flags, e.g. -runs=N or -max_total_time=S]

The corpus it grows lives in build/fuzz/corpus/TARGET, seeded from
tests/fuzz/corpus/TARGET; an input that fails (a Python exception other
than migrated's own errors, or a sanitizer report in the ASan/UBSan build)
is written to tests/fuzz/corpus/TARGET/ as crash-<sha1>, which the normal
suite replays from then on (tests/test_fuzz.py). libFuzzer's last lines say
the executions and the coverage reached (``cov:``, ``ft:``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent

with atheris.instrument_imports(include=["migrated", "fuzz_targets"]):
    import fuzz_targets


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in fuzz_targets.TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(fuzz_targets.TARGETS)}}} [libFuzzer flags]")
    name = argv[1]
    seeds = HERE / "fuzz" / "corpus" / name
    work = HERE.parent / "build" / "fuzz" / "corpus" / name
    work.mkdir(parents=True, exist_ok=True)
    for seed in seeds.iterdir():
        shutil.copy(seed, work / seed.name)
    flags = [a for a in argv[2:]]
    atheris.Setup(
        [argv[0], f"-artifact_prefix={seeds}/", "-max_len=8192", *flags, str(work)], fuzz_targets.TARGETS[name]
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
