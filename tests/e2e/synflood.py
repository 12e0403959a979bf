"""Sends TCP SYNs from distinct source ports to one address and port through a raw IPv4
socket, paced to a rate: a port scan or SYN flood, as a hostile client would send it.

Run only inside a network namespace the test created, aimed at the host end of its own
veth pair, so the packets never leave that pair.

    python3 synflood.py SRC DST DPORT COUNT RATE FIRST_SPORT
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


def main():
    src_s, dst_s, dport, count, rate, first_sport = sys.argv[1:7]
    src, dst = socket.inet_aton(src_s), socket.inet_aton(dst_s)
    dport, count, rate, first_sport = int(dport), int(count), float(rate), int(first_sport)
    # The kernel adds the IPv4 header (IP_HDRINCL off) with the namespace's own address.
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    start = time.monotonic()
    sent = 0
    sport = first_sport - 1
    for i in range(count):
        sport = sport + 1 if sport < 65535 else first_sport
        if sport == dport:
            # Both ports the server's: a direction by ports (tcpdump's tally) could not
            # tell in from out.
            sport += 1
        s.sendto(syn(src, dst, sport, dport, 0x1000 + i), (dst_s, 0))
        sent += 1
        # Pace in batches: a sleep per packet would cost more than the send.
        if i % 200 == 199:
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}))


if __name__ == "__main__":
    main()
