"""Sends TCP SYNs from distinct source ports to one address and port through a raw IPv4
socket, paced to a rate: a port scan or SYN flood, as a hostile client would send it.

Run only inside a network namespace the test created, aimed at the host end of its own
veth pair, so the packets never leave that pair.

    python3 synflood.py SRC DST DPORT COUNT RATE FIRST_SPORT
    python3 synflood.py --pairs FILE DST DPORT RATE
The second form sends one SYN from each (source address, source port) of the JSON list
in FILE, in order: each source address must be one of the namespace's own.
Prints a JSON object: how many SYNs were sent and how long it took."""

import json
import socket
import struct
import sys
import time


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def syn(src, dst, sport, dport, seq):
    header = struct.pack(">HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = struct.pack(">4s4sBBH", src, dst, 0, socket.IPPROTO_TCP, len(header))
    c = checksum(pseudo + header)
    return header[:16] + struct.pack(">H", c) + header[18:]


def flood(targets, dst_s, dport, rate):
    """SYNs from each (source address, source port) in `targets`, paced to `rate`."""
    dst = socket.inet_aton(dst_s)
    sockets = {}
    start = time.monotonic()
    sent = 0
    for i, (src_s, sport) in enumerate(targets):
        s = sockets.get(src_s)
        if s is None:
            # The kernel adds the IPv4 header (IP_HDRINCL off) with the address bound.
            s = sockets[src_s] = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
            s.bind((src_s, 0))
        s.sendto(syn(socket.inet_aton(src_s), dst, sport, dport, 0x1000 + i), (dst_s, 0))
        sent += 1
        # Pace in batches: a sleep per packet would cost more than the send.
        if i % 200 == 199:
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return {"sent": sent, "seconds": time.monotonic() - start}


def main():
    if sys.argv[1] == "--pairs":
        path, dst_s, dport, rate = sys.argv[2:6]
        with open(path) as f:
            targets = [tuple(t) for t in json.load(f)]
        print(json.dumps(flood(targets, dst_s, int(dport), float(rate))))
        return
    src_s, dst_s, dport, count, rate, first_sport = sys.argv[1:7]
    dport, count, first_sport = int(dport), int(count), int(first_sport)
    targets = []
    sport = first_sport - 1
    for _ in range(count):
        sport = sport + 1 if sport < 65535 else first_sport
        if sport == dport:
            # Both ports the server's: a direction by ports (tcpdump's tally) could not
            # tell in from out.
            sport += 1
        targets.append((src_s, sport))
    print(json.dumps(flood(targets, dst_s, dport, float(rate))))


if __name__ == "__main__":
    main()
