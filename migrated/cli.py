"""Command line of migrated.

Exit status, for scripts: 0 success (for ``send``: the receiver committed the
image and confirmed its digest), 1 the migration or daemon failed (the last
line on stderr says which side and why), 2 usage error, 3 cancelled by a
signal (the source was resumed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from migrated import __version__
from migrated.units import duration_arg, fraction_arg, parse_address, size_arg

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 3


class UsageError(Exception):
    pass


# ---------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from migrated._tools import bench

    if args.size < 1 or args.repeat < 1:
        raise UsageError("--size and --repeat must be at least 1")
    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = bench.run_all(args.size, args.repeat, parts=args.parts, progress=progress)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(bench.format_all(result))
    return EXIT_OK


# ---------------------------------------------------------------------------
# receive
# ---------------------------------------------------------------------------


def _receive(args: argparse.Namespace) -> int:
    import structlog
    import trio

    from migrated import log as logsetup
    from migrated.errors import StoreError
    from migrated.receiver import Receiver, ReceiverConfig

    try:
        host, port = parse_address(args.listen)
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}") from None
    tls, allow = _receive_tls(args, host)
    logsetup.configure(args.log_format, args.log_level)
    if args.insecure and tls is None:
        structlog.get_logger("migrated.cli").warning(
            "listen_insecure",
            listen=args.listen,
            hint="anyone who reaches this address can replace any image; use --tls-cert, --tls-key and --tls-ca",
        )
    try:
        receiver = Receiver(
            ReceiverConfig(
                args.dir,
                xbzrle=not args.no_xbzrle,
                idle_timeout=args.idle_timeout,
                shutdown_grace=args.shutdown_grace,
                stage_in_memory=args.stage_in_memory,
                handshake_timeout=args.handshake_timeout,
                send_timeout=args.send_timeout,
                max_connections=args.max_connections,
                max_migrations=args.max_migrations,
                tls=tls,
                tls_allow=allow,
                max_image_size=args.max_image_size,
                min_rate=args.min_rate,
                reserve=args.reserve,
            )
        )
        receiver.store.lock()  # here, for a clear message: serve() keeps it
    except StoreError as exc:
        print(f"migrated: receive failed: {exc}", file=sys.stderr)
        return EXIT_FAILED

    async def main() -> int:
        from migrated import systemd

        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            print(f"migrated: receive failed: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILED
        async with trio.open_nursery() as nursery:

            async def on_signals():
                # first signal: stop accepting and drain; second: abort now
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        if receiver.stopping:
                            nursery.cancel_scope.cancel()
                        else:
                            systemd.notify("STOPPING=1")
                            receiver.shutdown()

            async def serve(task_status=trio.TASK_STATUS_IGNORED):
                await receiver.serve(listeners, task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signals)
            await nursery.start(serve)
            systemd.notify("READY=1\nSTATUS=accepting migrations")
        return EXIT_OK

    return trio.run(main)


# ---------------------------------------------------------------------------
# send
# ---------------------------------------------------------------------------


def make_source(args: argparse.Namespace):
    """The source named by ``--source`` (``file:PATH`` or ``pid:PID``)."""
    kind, sep, rest = args.source.partition(":")
    if not sep or not rest:
        raise UsageError(f"--source {args.source!r}: use file:PATH or pid:PID")
    if kind == "file":
        if args.after != "stop":
            raise UsageError("--after applies to --source pid:PID only")
        if args.dirty_tracking == "soft-dirty":
            raise UsageError(
                "--dirty-tracking soft-dirty applies to --source pid:PID only; a file takes auto, uffd or scan"
            )
        from migrated.source import FileSource

        return FileSource(rest, pause_pid=args.pause_pid, tracking=args.dirty_tracking)
    if kind == "pid":
        if not rest.isdigit():
            raise UsageError(f"--source {args.source!r}: PID must be a number")
        if args.pause_pid:
            raise UsageError("--pause-pid applies to --source file:PATH; a pid source freezes the process itself")
        from migrated.procmem import ProcessSource

        return ProcessSource(int(rest), tracking=args.dirty_tracking, after=args.after)
    raise UsageError(f"--source {args.source!r}: unknown kind {kind!r}; use file:PATH or pid:PID")


def _send_config(args: argparse.Namespace):
    """The migration's settings from the command line (usage errors first)."""
    from migrated.errors import RecordError
    from migrated.sender import SendConfig
    from migrated.store import check_name

    if args.max_iterations < 1:
        raise UsageError("--max-iterations must be at least 1")
    if args.max_bandwidth is not None and args.max_bandwidth < 4096:
        raise UsageError("--max-bandwidth must be at least 4K (bytes per second)")
    try:
        check_name(args.name)
    except RecordError as exc:
        raise UsageError(f"--name: {exc}") from None
    return SendConfig(
        name=args.name,
        cache_size=args.cache_size,
        max_bandwidth=args.max_bandwidth,
        downtime_limit=args.downtime_limit,
        max_iterations=args.max_iterations,
        xbzrle=not args.no_xbzrle,
        timeout=args.timeout,
        auto_converge=args.auto_converge,
        max_throttle=args.max_throttle,
    )


def _send(args: argparse.Namespace) -> int:
    import trio

    from migrated import log as logsetup

    try:
        address = parse_address(args.to)
    except ValueError as exc:
        raise UsageError(f"--to: {exc}") from None
    config = _send_config(args)
    tls = _send_tls(args)
    source = make_source(args)
    logsetup.configure(args.log_format, args.log_level)
    return trio.run(_send_main, args, config, source, address, tls)


async def _send_main(args: argparse.Namespace, config, source, address: tuple[str, int], tls=None) -> int:
    """One migration, with SIGINT/SIGTERM cancelling it; reports and returns
    the exit status. The source is closed on every path."""
    import structlog
    import trio

    from migrated.errors import MigrationCancelled, MigrationError
    from migrated.sender import Sender

    structlog.contextvars.bind_contextvars(migration=config.name, peer=args.to)
    sender = Sender(source, config)
    status = EXIT_OK
    failure: BaseException | None = None  # what the operator is told of

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, scope)
            try:
                await _migrate(sender, source, address, args.to, tls, args.tls_hostname)
            except MigrationError as exc:
                status, failure = EXIT_FAILED, exc
            except Exception as exc:  # a bug: say so plainly, never a bare traceback on stdout
                structlog.get_logger("migrated.cli").exception("fail_migration", code="internal")
                status, failure = EXIT_FAILED, exc
            finally:
                nursery.cancel_scope.cancel()
                source.close()
    if scope.cancelled_caught:  # the signal is what the operator is told of, in any phase
        status, failure = EXIT_CANCELLED, MigrationCancelled("cancelled by a signal; the source was resumed")
        sender.fail(failure)
    elif failure is not None and sender.error is None:  # failed before the migration started
        sender.fail(failure if isinstance(failure, MigrationError) else MigrationError(repr(failure)))  # internal
    _report(args, sender, failure)
    return status


async def _cancel_on_signal(scope) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()


async def _migrate(sender, source, address: tuple[str, int], to: str, tls=None, hostname=None) -> None:
    import trio

    from migrated.errors import NetworkError, TlsSetupError
    from migrated.tlsstream import TLSStream

    await trio.to_thread.run_sync(source.open)
    stream: trio.abc.Stream
    try:
        with trio.fail_after(sender.config.timeout):
            stream = await trio.open_tcp_stream(*address)
    except trio.TooSlowError:
        raise NetworkError(f"cannot connect to the receiver at {to}: timed out") from None
    except OSError as exc:
        raise NetworkError(f"cannot connect to the receiver at {to}: {exc.strerror or exc}") from None
    async with stream:
        if tls is not None:
            stream = secure = TLSStream(stream, tls, server_hostname=hostname or address[0])
            try:
                with trio.fail_after(sender.config.timeout):
                    await secure.do_handshake()
            except trio.TooSlowError:
                raise NetworkError(f"TLS handshake with the receiver at {to}: no answer in time") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                why = exc.__cause__ or exc
                text = str(why).upper()
                hint = ""
                if "WRONG_VERSION" in text:
                    hint = " (is the receiver listening without TLS?)"
                elif "MISMATCH" in text:
                    hint = " (its certificate names another host: connect by that name, or give --tls-hostname)"
                raise TlsSetupError(f"TLS handshake with the receiver at {to} failed: {why}{hint}") from None
        await sender.run(stream)


def _report(args: argparse.Namespace, sender, failure: BaseException | None) -> None:
    """The summary on stdout; on failure, the one-line reason on stderr."""
    from migrated.report import format_summary, summary

    s = summary(sender)
    try:
        print(json.dumps(s) if args.json else format_summary(s), flush=True)
    except BrokenPipeError:  # `| head -c1`: the migration's outcome stands, and the exit status says it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit does not fail again
        os.close(devnull)
        print(f"migrated: stdout was closed; the summary was not printed (status {s['status']})", file=sys.stderr)
    if failure is not None:
        e = s["error"]
        print(f"migrated: send {s['status']} ({e['side']}): {e['code']}: {failure}", file=sys.stderr)


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------

SEND_EPILOG = """\
examples:
  migrated send --source file:/var/lib/vm/ram.img --to dest.example:7700 --name vm1 --pause-pid 4242 \\
      --tls-cert sender.pem --tls-key sender.key --tls-ca ca.pem
  migrated send --source pid:4242 --to 127.0.0.1:7700 --name worker --max-bandwidth 100M --json

With --tls-ca (or --tls-cert), the connection is TLS 1.3 and the receiver's
certificate must match the host in --to (or --tls-hostname). "verified" in
the summary means the receiver confirmed the digest and was authenticated
(by TLS) or is this machine (loopback).

exit status: 0 committed, its digest confirmed by the receiver ("verified" in the
summary also says the receiver was authenticated), 1 failed (stderr says which side and why),
2 usage error, 3 cancelled by SIGINT/SIGTERM (the source is resumed)."""

RECEIVE_EPILOG = """\
examples:
  migrated receive --dir /var/lib/migrated          (127.0.0.1:7700, plain TCP)
  migrated receive --listen 0.0.0.0:7700 --dir /var/lib/migrated \\
      --tls-cert dest.pem --tls-key dest.key --tls-ca ca.pem --tls-allow sender.example:vm-*

Off loopback the receiver needs mutual TLS (--tls-cert, --tls-key and
--tls-ca: every client shows a certificate the CA signed), or --insecure.
--tls-allow SUBJECT[:NAME-GLOB] (repeatable) admits a client whose
certificate names SUBJECT (common name, DNS or URI name) for the image names
matching the glob; without it, every client the CA signed may send any name.

Each image is committed as DIR/NAME (a symlink to a complete version with a
manifest.json and one file per block). SIGTERM stops accepting and gives
running migrations --shutdown-grace to finish; a second signal aborts them."""


def _receive_tls(args: argparse.Namespace, host: str):
    """The receiver's TLS context and allow-list from the command line; off
    loopback, mutual TLS or --insecure."""
    from migrated.errors import TlsSetupError
    from migrated.tls import Allow, TlsFiles, is_loopback, server_context

    files = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    try:
        allow = tuple(Allow.parse(a) for a in args.tls_allow)
    except ValueError as exc:
        raise UsageError(f"--tls-allow {exc}") from None
    if allow and not files.ca:
        raise UsageError("--tls-allow needs --tls-ca: only a verified client certificate names its subject")
    if not is_loopback(host) and not files.ca and not args.insecure:
        raise UsageError(
            f"--listen {args.listen}: off loopback the receiver needs mutual TLS (--tls-cert, --tls-key, "
            "--tls-ca), or --insecure to accept anyone who reaches the port"
        )
    if not files.enabled:
        return None, allow
    try:
        return server_context(files), allow
    except TlsSetupError as exc:
        raise UsageError(str(exc)) from None


def _send_tls(args: argparse.Namespace):
    """The sender's TLS context (None: plain TCP)."""
    from migrated.errors import TlsSetupError
    from migrated.tls import TlsFiles, client_context

    files = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    if args.tls_hostname and not files.enabled:
        raise UsageError("--tls-hostname needs TLS: give --tls-ca (and --tls-cert, --tls-key)")
    if not files.enabled:
        return None
    try:
        return client_context(files)
    except TlsSetupError as exc:
        raise UsageError(str(exc)) from None


def _tls_args(p: argparse.ArgumentParser, peer: str) -> None:
    p.add_argument("--tls-cert", metavar="FILE", help="this side's certificate (PEM); turns TLS 1.3 on")
    p.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    p.add_argument(
        "--tls-ca", metavar="FILE", help=f"the CA certificate(s) that must have signed the {peer}'s certificate (PEM)"
    )


def _count_arg(text: str) -> int:
    """A whole number of at least 1, for argparse."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n


def _log_args(p: argparse.ArgumentParser) -> None:
    from migrated.log import FORMATS

    p.add_argument(
        "--log-format",
        choices=FORMATS,
        default="auto",
        help="console lines on a TTY, JSON lines otherwise (default auto)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migrated",
        description="Live memory migration over TCP with XBZRLE page deltas: `migrated receive` on the "
        "destination, `migrated send` on the source.",
    )
    parser.add_argument("--version", action="version", version=f"migrated {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "send",
        help="migrate a file image or a process's memory to a receiver",
        description="Copy a memory image to a receiver while it keeps changing: pass 0 sends every page, "
        "later passes only changed pages (as XBZRLE deltas against an LRU cache of last-sent pages), "
        "until the rest fits in --downtime-limit; then the writer is frozen, the rest sent, and the "
        "receiver verifies the digest and commits.",
        epilog=SEND_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--source",
        required=True,
        metavar="file:PATH|pid:PID",
        help="a file image (with --pause-pid for its writer) or a live process",
    )
    s.add_argument("--to", required=True, metavar="HOST:PORT", help="address of `migrated receive`")
    s.add_argument("--name", required=True, help="image name on the receiver (letters, digits, . _ -)")
    s.add_argument(
        "--cache-size",
        type=size_arg,
        default=64 << 20,
        metavar="SIZE",
        help="XBZRLE cache of last-sent pages, K/M/G suffixes (default 64M)",
    )
    s.add_argument(
        "--max-bandwidth",
        type=size_arg,
        default=None,
        metavar="RATE",
        help="cap on bytes per second written to the socket, K/M/G suffixes (default unlimited)",
    )
    s.add_argument(
        "--downtime-limit",
        type=duration_arg,
        default=0.3,
        metavar="DURATION",
        help="longest acceptable final pass with the source frozen, ms or s (default 300ms)",
    )
    s.add_argument(
        "--max-iterations",
        type=int,
        default=30,
        metavar="N",
        help="passes before the final pass is forced; then converged is false (default 30)",
    )
    s.add_argument("--no-xbzrle", action="store_true", help="send whole pages only")
    s.add_argument(
        "--pause-pid",
        type=int,
        metavar="PID",
        help="file source: the writer process, SIGSTOPped for the final pass and resumed after",
    )
    s.add_argument(
        "--dirty-tracking",
        choices=("auto", "soft-dirty", "uffd", "scan"),
        default="auto",
        help="pid source: kernel soft-dirty bits, userfaultfd write-protect (Linux 6.7+, x86-64, needs ptrace "
        "rights) or a page hash scan; file source: userfaultfd tracking of the --pause-pid writer's mappings "
        "where the file is shared memory (tmpfs, /dev/shm, memfd, hugetlbfs; writes through write(2) or by "
        "other processes are not seen: use scan for those), or the scan; auto takes the first that works "
        "here and logs why (default auto)",
    )
    s.add_argument(
        "--after",
        choices=("stop", "kill", "resume"),
        default="stop",
        help="pid source: what happens to the process once the image is committed (default stop: "
        "left SIGSTOPped, since its memory now lives at the destination)",
    )
    s.add_argument(
        "--auto-converge",
        action="store_true",
        help="slow down a source that dirties pages faster than they can be sent: after a pass that left "
        "more than half as many pages dirty as it sent, hold the process (or the --pause-pid writer) "
        "stopped for a growing share of every 50 ms (SIGSTOP/SIGCONT, as QEMU's cpu-throttle), until the "
        "final pass; it runs at full speed again afterwards, even if the sender dies. Its parent sees the "
        "stops as it would any SIGSTOP (default off)",
    )
    s.add_argument(
        "--max-throttle",
        type=fraction_arg,
        default=0.99,
        metavar="FRACTION",
        help="with --auto-converge, the largest share of the time the source is held stopped, 0 to 0.99 "
        "or a percentage (default 0.99)",
    )
    s.add_argument(
        "--timeout",
        type=duration_arg,
        default=60.0,
        metavar="DURATION",
        help="longest wait to connect and for each answer from the receiver (default 60s)",
    )
    _tls_args(s, "receiver")
    s.add_argument(
        "--tls-hostname",
        metavar="NAME",
        help="the name the receiver's certificate must carry (default: the host in --to)",
    )
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    _log_args(s)
    s.set_defaults(func=_send)

    r = sub.add_parser(
        "receive",
        help="serve migrations into an image directory",
        description="Accept migrations over TCP and commit each verified image atomically under --dir.",
        epilog=RECEIVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument(
        "--listen",
        default="127.0.0.1:7700",
        metavar="HOST:PORT",
        help="address to listen on (port 0: any free); off loopback it needs mutual TLS or --insecure "
        "(default 127.0.0.1:7700)",
    )
    r.add_argument("--dir", required=True, help="image directory (created if missing)")
    r.add_argument("--no-xbzrle", action="store_true", help="accept whole pages only")
    _tls_args(r, "sender")
    r.add_argument(
        "--tls-allow",
        action="append",
        default=[],
        metavar="SUBJECT[:NAME-GLOB]",
        help="admit a client whose certificate names SUBJECT (common name, DNS or URI name) for the image "
        "names matching the glob (default: any name); repeatable; without it, every client the CA signed",
    )
    r.add_argument(
        "--insecure",
        action="store_true",
        help="listen off loopback without TLS: anyone who reaches the port can replace any image",
    )
    r.add_argument(
        "--idle-timeout",
        type=duration_arg,
        default=60.0,
        metavar="DURATION",
        help="fail a migration whose sender sends nothing for this long (default 60s)",
    )
    r.add_argument(
        "--shutdown-grace",
        type=duration_arg,
        default=30.0,
        metavar="DURATION",
        help="on SIGTERM, time running migrations get to finish (default 30s)",
    )
    r.add_argument(
        "--handshake-timeout",
        type=duration_arg,
        default=10.0,
        metavar="DURATION",
        help="fail a connection whose HELLO has not arrived this long after it was accepted (default 10s)",
    )
    r.add_argument(
        "--send-timeout",
        type=duration_arg,
        default=30.0,
        metavar="DURATION",
        help="fail a migration whose sender does not take an answer sent to it for this long (default 30s)",
    )
    r.add_argument(
        "--min-rate",
        type=size_arg,
        default=1024,
        metavar="RATE",
        help="bytes a second a sender must send at least, averaged over each 60 s (0: no bound); a sender "
        "that trickles below it would hold its migration slot and reservation (default 1K)",
    )
    r.add_argument(
        "--max-image-size",
        type=size_arg,
        default=None,
        metavar="SIZE",
        help="largest image accepted, K/M/G/T suffixes; larger block lists are refused with 'limit' before "
        "anything is reserved (default: what the directory's filesystem has free beyond --reserve)",
    )
    r.add_argument(
        "--reserve",
        type=fraction_arg,
        default=0.05,
        metavar="FRACTION",
        help="share of the directory's filesystem no image may take, 0 to 0.99 or a percentage "
        "(default 5%%); a block list that would need it is refused with 'no-space'",
    )
    r.add_argument(
        "--max-connections",
        type=_count_arg,
        default=64,
        metavar="N",
        help="connections open at once; more are refused with 'limit' (default 64)",
    )
    r.add_argument(
        "--max-migrations",
        type=_count_arg,
        default=8,
        metavar="N",
        help="migrations past their handshake at once; more are refused with 'limit' (default 8)",
    )
    r.add_argument(
        "--stage-in-memory",
        action="store_true",
        help="hold each image being received in memory (one memfd per block) and write it to --dir in one "
        "sequential pass at the commit, after the digest matched: a disk that cannot keep up with scattered "
        "page writes then does not hold a fast-changing source back from converging. Needs memory for the "
        "whole image (allocated up front; its space in --dir is reserved too). The commit takes as long as "
        "writing the image: outside the downtime of a source released at VERIFIED (--after resume, a file's "
        "writer), inside it for --after stop or kill; the sender waits up to 10 minutes for it (default "
        "off: pages go to the block files as they arrive)",
    )
    _log_args(r)
    r.set_defaults(func=_receive)

    b = sub.add_parser(
        "bench",
        help="measure the core and end-to-end migration against ceilings measured in the same run",
        description=(
            "Measure XBZRLE encode/decode, batch encode (cache + framing), batch apply and the dirty "
            "scan against memcmp/memcpy, then end-to-end loopback migration against a raw socket copy, "
            "then a writer of 256 MiB and 1 GiB migrated as a process by pid and as a file image in "
            "/dev/shm, with userfaultfd tracking and with the scan (MIGRATED_BENCH_SIZES=256,1024,4096,8192 "
            "for more), "
            "then the original XBZRLE experiment at several bandwidths."
        ),
    )
    b.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    b.add_argument(
        "--size", type=int, default=64, metavar="MIB", help="core working set per buffer in MiB (default 64)"
    )
    b.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="N",
        help="repetitions, best is kept (default 3; at least 5 end to end)",
    )
    b.add_argument(
        "--parts",
        default="core,e2e,tls,scaling,experiment",
        help="comma-separated parts to run: core, e2e, tls, scaling, experiment (default all)",
    )
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"migrated: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_CANCELLED
