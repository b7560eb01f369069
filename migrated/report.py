"""What a migration reports: its status, the summary (the fields of QEMU's
``info migrate``) and the summary as ``migrated send`` prints it.

The summary is built from a ``Sender``'s state at any point, during or
after the migration; nothing here changes that state.
"""

from __future__ import annotations

import enum
import re
import resource
from typing import TYPE_CHECKING, Any

from migrated.units import format_size, ms

if TYPE_CHECKING:
    from migrated.sender import Sender

__all__ = ["Status", "format_summary", "summary"]


class Status(enum.StrEnum):
    SETUP = "setup"  # connecting, handshake
    ACTIVE = "active"  # passes running
    COMPLETED = "completed"  # committed and verified
    FAILED = "failed"
    CANCELLED = "cancelled"


def summary(s: Sender) -> dict[str, Any]:
    """The summary of ``s`` as of now (JSON-ready)."""
    t = s.totals
    page_size = s.config.page_size
    end = s.finished if s.finished is not None else s.now()
    seconds = max(end - s.started, 1e-9)
    out: dict[str, Any] = {
        "status": str(s.status),
        "converged": s.converged,
        "stop_reason": s.stop_reason,
        "iterations": len(s.passes),
        "total_time_ms": ms(end - s.started),
        "setup_time_ms": ms(s.setup_seconds),
        "downtime_ms": ms(s.downtime),
        "expected_downtime_ms": ms(s.expected_downtime),
        "downtime_breakdown": s.downtime_breakdown,
        "ram": {
            "total_bytes": sum(t.info.length for t in s.layout.tracked.values()),
            "transferred_bytes": s.transferred,
            "remaining_bytes": 0 if s.status is Status.COMPLETED else s.remaining_pages * page_size,
            "zero_pages": t.zero_pages,
            "normal_pages": t.normal_pages,
            "normal_bytes": t.normal_bytes,
            "dirty_pages_rate": round(s.dirty_rate, 1),
            "mbps": round(s.transferred * 8 / seconds / 1e6, 2),
        },
        "xbzrle": {
            "enabled": s.xbzrle.negotiated,
            "negotiated": s.xbzrle.negotiated,
            "offered": s.config.xbzrle,
            "cache_size": s.config.cache_size if s.xbzrle.negotiated else 0,
            "bytes": t.xbzrle_bytes,
            "pages": t.xbzrle_pages,
            "cache_miss": t.cache_miss,
            "cache_miss_rate": round(t.cache_miss / t.cache_lookups, 4) if t.cache_lookups else 0.0,
            "encoding_rate": round(t.xbzrle_pages * page_size / t.xbzrle_bytes, 2) if t.xbzrle_bytes else 0.0,
            "overflow": t.overflow,
            "passes_off": sum(1 for r in s.passes if s.xbzrle.negotiated and not r.xbzrle),
        },
        "auto_converge": {
            "enabled": s.config.auto_converge,
            "throttle": round(s.throttle_policy.level, 2),  # the last level reached
            "stopped_ms": ms(s.throttle.stopped_seconds) if s.throttle is not None else 0.0,
        },
        "passes": [
            {
                "pass": r.number,
                "pages": r.pages,
                "wire_bytes": r.wire_bytes,
                "seconds": round(r.seconds, 4),
                "xbzrle": r.xbzrle,
                "xbzrle_pages": r.stats.xbzrle_pages,
                "throttle": round(r.throttle, 2),
                # finding the pages dirty after this pass (the final pass: what the freeze left)
                "scan_ms": ms(s.scan_seconds[i]) if i < len(s.scan_seconds) else None,
                # rearming the tracked writes of its spans while it ran (Source.rearm)
                "rearm_ms": ms(s.rearm_seconds[i]) if i < len(s.rearm_seconds) else None,
            }
            for i, r in enumerate(s.passes)
        ],
        "digest": s.digest,
        "verified": s.verified,
        # who vouches for the receiver's confirmation: tls, loopback, in-process, none
        # (none: a plain TCP receiver elsewhere; its word is not authenticated)
        "receiver_authenticated": s.receiver_auth,
        "image": s.committed_path,
        "source": s.source.description,
        "dirty_tracking": s.source.tracking,
        "source_info": s.source.info(),
        "sender_peak_rss_bytes": peak_rss(),
        # without a file source's mapped pages (page cache): sampled after every pass
        "sender_peak_private_bytes": max(s.private_peak, private_rss()),
    }
    if s.error:
        out["error"] = s.error
    return out


def peak_rss() -> int:
    """This process's peak resident memory in bytes (a file source's mapped
    pages count too, though they are page cache, not the sender's). From
    VmHWM: getrusage's ru_maxrss keeps the parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as fh:
            found = re.search(r"^VmHWM:\s+(\d+) kB", fh.read(), re.M)
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def private_rss() -> int:
    """This process's resident anonymous memory in bytes (RssAnon: its own
    buffers, cache and heap, not the page cache of a file it maps), 0 where
    it cannot be read."""
    try:
        with open("/proc/self/status") as fh:
            found = re.search(r"^RssAnon:\s+(\d+) kB", fh.read(), re.M)
    except OSError:
        return 0
    return int(found.group(1)) * 1024 if found else 0


def _verified_note(s: dict[str, Any]) -> str:
    if s["verified"]:
        return f" (digest verified by the receiver, {s['receiver_authenticated']})"
    if s.get("image") and s["receiver_authenticated"] == "none":
        return " (the receiver's confirmation is not authenticated: plain TCP to another host; use TLS)"
    return ""


def format_summary(s: dict[str, Any]) -> str:
    """The human summary printed by ``migrated send``."""
    after = s.get("downtime_breakdown", {}).get("commit_after_release_ms")
    released = "commit" if after is None else f"verified image (durable {after:.0f} ms later)"
    ram, xb = s["ram"], s["xbzrle"]
    downtime = s["downtime_ms"] if s["downtime_ms"] is not None else "-"
    lines = [
        f"status:             {s['status']}" + _verified_note(s),
        f"converged:          {'yes' if s['converged'] else 'no'} after {s['iterations']} passes",
        f"total time:         {s['total_time_ms'] / 1000:.2f} s (setup {s['setup_time_ms']:.0f} ms)",
        f"downtime:           {downtime} ms from freeze to {released} (estimated at {s['expected_downtime_ms']} ms)",
        f"image:              {format_size(ram['total_bytes'])} from {s['source']}",
        f"transferred:        {format_size(ram['transferred_bytes'])} at {ram['mbps']} Mbit/s",
        f"pages:              {ram['normal_pages']} raw, {ram['zero_pages']} zero, {xb['pages']} xbzrle",
    ]
    if xb["enabled"]:
        lines.append(
            f"xbzrle:             {format_size(xb['bytes'])} of deltas, encoding rate {xb['encoding_rate']}, "
            f"cache miss rate {xb['cache_miss_rate']:.1%}, {xb['overflow']} overflows, "
            f"off for {xb['passes_off']} passes"
        )
    else:
        why = "disabled on the sender" if not xb["offered"] else "negotiated off by the receiver"
        lines.append(f"xbzrle:             off ({why})")
    if s.get("image"):
        lines.append(f"committed at:       {s['image']}")
    if s.get("error"):
        e = s["error"]
        lines.append(f"error:              {e['side']}: {e['code']}: {e['message']}")
    return "\n".join(lines)
