"""What metrics add to the relay's hot path, measured in process (no network noise).

The end-to-end A/B in bench/run.py (`proxy` vs `proxy-metrics`) is within this VM's noise, so this
replays the recorder calls the relay makes for the bench workloads, exactly as it makes them:
the byte stream of W1 (512 KiB objects) and W2 (256 MiB objects) is cut into 64 KiB reads, framed
by PDUFramer with cut-through on, and for every read `received()`, for every PDU `pdata()` or
`data_fragment()`, as proxy/relay.py does when `dimse_enabled`, timed alone (wall time of a
single-threaded loop, best of N). It prints the cost per object and per GB, and that as a share of
the proxy's own CPU per GB from the last `make bench`. Scrapes come on top: about 7.6 ms of CPU each.

    .venv/bin/python bench/bench_metrics.py [--proxy-cpu-per-gb 1.45]
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from proxy import config as config_mod
from proxy.dul.dimse import CommandField, Tag, encode_command_set, parse_command_set, response_for, uid_value, us_value
from proxy.dul.framer import P_DATA_HEAD, Frame, PDUFramer
from proxy.dul.machine import Side
from proxy.metrics import AssociationRecorder, ProxyMetrics

PDU = 131072  # storescu -pdu in the bench
READ = 65536
SC = "1.2.840.10008.5.1.4.1.1.7.2"  # Multiframe Grayscale Byte SC, as bench/datasets.py writes


def _pdata(context_id: int, control: int, fragment: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def streams(object_size: int, objects: int) -> tuple[bytes, bytes]:
    """(modality -> archive, archive -> modality) bytes of `objects` C-STOREs in one association."""
    to_archive, to_modality = bytearray(), bytearray()
    for message_id in range(1, objects + 1):
        rq = encode_command_set([
            (Tag.AFFECTED_SOP_CLASS_UID, uid_value(SC)), (Tag.COMMAND_FIELD, us_value(CommandField.C_STORE_RQ)),
            (Tag.MESSAGE_ID, us_value(message_id)), (Tag.PRIORITY, us_value(0)),
            (Tag.COMMAND_DATA_SET_TYPE, us_value(0)),
            (Tag.AFFECTED_SOP_INSTANCE_UID, uid_value(f"1.2.826.0.1.3680043.10.1499.{message_id}")),
        ])
        to_archive += _pdata(1, 0x03, rq)
        left = object_size
        while left:
            size = min(PDU - 6, left)
            left -= size
            to_archive += _pdata(1, 0x02 if not left else 0x00, bytes(size))
        to_modality += _pdata(1, 0x03, response_for(parse_command_set(rq), 0))
    return bytes(to_archive), bytes(to_modality)


Reads = list[tuple[int, list[Frame]]]


def framed(data: bytes) -> Reads:
    """The stream as the relay sees it: 64 KiB reads, each with the frames PDUFramer made of it."""
    framer = PDUFramer(sniff_foreign=False, max_pdata_length=PDU)
    framer.cut_through = True
    view = memoryview(data)
    return [(len(view[o : o + READ]), framer.feed(view[o : o + READ])) for o in range(0, len(view), READ)]


def replay(recorder: AssociationRecorder, reads: Reads, side: Side) -> None:
    """The relay's metrics calls for one direction, read by read (relay.py, dimse_enabled)."""
    received, pdata, fragment = recorder.received, recorder.pdata, recorder.data_fragment
    for nbytes, frames in reads:
        received(side, nbytes, frames)
        for frame in frames:
            if frame.pdu_type == 0x04:
                pdata(side, frame.data)
            elif frame.pdu_type == P_DATA_HEAD:
                fragment(side, frame.data)


def measure(object_size: int, objects: int, repeats: int) -> float:
    """CPU seconds per object the recorder costs (best of `repeats`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "proxy.yaml"
        path.write_text("listeners: [{name: m, address: '127.0.0.1:1'}]\n"
                        "upstreams: {pacs: {address: '127.0.0.1:2'}}\ndefault_upstream: pacs\n")
        config = config_mod.load(path)
    metrics = ProxyMetrics(CollectorRegistry(), config)
    up, down = (framed(stream) for stream in streams(object_size, objects))
    best = float("inf")
    for _ in range(repeats):
        recorder = metrics.association("m")
        recorder.requested("CT01")
        recorder.routed("pacs")
        t0 = time.perf_counter()
        replay(recorder, up, Side.REQUESTOR)
        replay(recorder, down, Side.ACCEPTOR)
        best = min(best, (time.perf_counter() - t0) / objects)
        recorder.flush()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy-cpu-per-gb", type=float, default=1.45,
                        help="the proxy's CPU s/GB from bench/RESULTS.md (W1 and W2 are close)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"metrics in the hot path (best of {args.repeats}); share of {args.proxy_cpu_per_gb} s/GB of proxy CPU")
    for name, size, count in (("W1 (512 KiB objects)", 512 * 1024, 400), ("W2 (256 MiB objects)", 256 << 20, 2)):
        per_object = measure(size, count, args.repeats)
        per_gb = per_object * 1e9 / size
        print(f"  {name:22s} {per_object * 1e6:8.1f} us per object  {per_gb * 1000:6.1f} ms per GB  "
              f"{100 * per_gb / args.proxy_cpu_per_gb:5.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
