"""``make demo``: a real migration on loopback, start to finish.

Starts ``migrated receive``, builds a 256 MiB image file (a quarter zero,
the rest random), starts a writer that changes a few bytes of each page of
a 48 MiB region over and over, and runs ``migrated send`` with the writer
as ``--pause-pid`` at a 128 MiB/s cap. Prints the summary and where the
committed image is.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

from migrated._tools.localrun import CLI, ReceiverProcess, WriterProcess

MiB = 1 << 20


def build_image(path: Path, size: int) -> None:
    rng = random.Random(42)
    with open(path, "wb") as fh:
        fh.write(bytes(size // 4))
        left = size - size // 4
        while left:
            n = min(left, 16 * MiB)
            fh.write(rng.randbytes(n))
            left -= n


def main() -> int:
    out = Path("demo-out").absolute()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    src = out / "source.img"
    print(f"demo: building a 256 MiB image at {src}", flush=True)
    build_image(src, 256 * MiB)
    receiver = ReceiverProcess(out / "images", out / "receiver.log")
    print(f"demo: receiver listening on {receiver.address}, images in {receiver.dir}", flush=True)
    writer = WriterProcess(src, "--offset", str(128 * MiB), "--length", str(48 * MiB), "--stride", "1024")
    print(f"demo: writer pid {writer.pid} changes 4 bytes of every page of 48 MiB, continuously", flush=True)
    try:
        cmd = [
            *CLI,
            "send",
            "--source",
            f"file:{src}",
            "--to",
            receiver.address,
            "--name",
            "demo",
            "--pause-pid",
            str(writer.pid),
            "--max-bandwidth",
            "128M",
            "--log-format",
            "console",
        ]
        print("demo: " + " ".join(cmd[2:]), flush=True)
        rc = subprocess.call(cmd)
    finally:
        writer.kill()
        receiver.stop()
    if rc == 0:
        print(f"\ndemo: committed image: {receiver.dir / 'demo'} (manifest.json + block files)")
        print(f"demo: receiver log: {receiver.log}")
    else:
        print(f"\ndemo: the migration failed (exit {rc}); receiver log: {receiver.log}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
