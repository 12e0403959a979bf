"""Sends crafted Ethernet frames out of one interface through a packet socket.

Used by the tests from inside their own network namespace (or on the host end of their
own veth pair), so the frames only ever cross that veth pair. The destination MAC is
not the receiver's, so the receiving kernel drops the frames without answering them,
while packet sockets (pg_netstat, tcpdump) still see each one.

    python3 inject.py IFACE SPEC.json     SPEC: a list of frame specs, see build()
Prints a JSON list: the wire length of each frame sent."""

import json
import socket
import struct
import sys
import time

OTHER_HOST = bytes.fromhex("020000000099")


def ipv4_header(proto, payload_len, options=0, frag_offset=0, more_fragments=False, src="169.254.77.2",
                dst="169.254.77.1"):
    ihl = 5 + options // 4
    flags_frag = (0x2000 if more_fragments else 0) | (frag_offset & 0x1FFF)
    h = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, (ihl * 4 + payload_len) & 0xFFFF, 0x1234, flags_frag, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h + b"\x01" * options


def ipv6_header(next_header, payload_len, src="fd77::2", dst="fd77::1"):
    return struct.pack(">IHBB16s16s", 0x60000000, payload_len & 0xFFFF, next_header, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst))


def tcp_header(sport, dport):
    return struct.pack(">HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x10, 1024, 0, 0)


def build(spec, src_mac):
    """A frame from a spec: {"ip": 4|6, "sport", "dport", "payload": bytes of payload,
    "options": IPv4 option bytes, "frag_offset", "more_fragments", "vlan": VLAN id,
    "udp": true}."""
    payload = b"p" * spec.get("payload", 0)
    if spec.get("udp"):
        l4 = struct.pack(">HHHH", spec["sport"], spec["dport"], 8 + len(payload), 0) + payload
        proto = 17
    else:
        l4 = tcp_header(spec["sport"], spec["dport"]) + payload
        proto = 6
    if spec.get("ip", 4) == 6:
        l3, ethertype = ipv6_header(proto, len(l4)) + l4, 0x86DD
    else:
        l3 = ipv4_header(proto, len(l4), spec.get("options", 0), spec.get("frag_offset", 0),
                         spec.get("more_fragments", False)) + l4
        ethertype = 0x0800
    dst = bytes.fromhex(spec["dst_mac"]) if "dst_mac" in spec else OTHER_HOST
    if "vlan" in spec:
        return dst + src_mac + struct.pack(">HHH", 0x8100, spec["vlan"], ethertype) + l3
    return dst + src_mac + struct.pack(">H", ethertype) + l3


SOL_PACKET, PACKET_VNET_HDR = 263, 15


def vnet_header(spec):
    """A virtio_net_hdr that marks the frame as one TCP GSO packet (as a virtio NIC or tap
    device hands the kernel GRO-sized packets): checksum to be filled in, segments of 1440."""
    ipv6 = spec.get("ip", 4) == 6
    l3 = 40 if ipv6 else 20 + spec.get("options", 0)
    gso_type = 4 if ipv6 else 1  # VIRTIO_NET_HDR_GSO_TCPV6 / _TCPV4
    return struct.pack("<BBHHHH", 1, gso_type, 14 + l3 + 20, 1440, 14 + l3, 16)


def main():
    iface, spec_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        specs = json.load(f)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    src_mac = s.getsockname()[4][:6]
    gso = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    gso.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    gso.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    gso.bind((iface, 0))
    sent = []
    for spec in specs:
        frame = build(spec, src_mac)
        if spec.get("gso"):
            # Longer than any IP length field holds: the fields say 0, as in BIG TCP.
            frame = frame[:16] + b"\0\0" + frame[18:] if spec.get("ip", 4) == 4 else frame[:18] + b"\0\0" + frame[20:]
            for _ in range(spec.get("count", 1)):
                gso.send(vnet_header(spec) + frame)
                sent.append(len(frame))
            continue
        # "pace": frames per millisecond at most, so the veth pair (whose receive ring
        # holds 256 frames) never drops any before the packet sockets see them.
        pace = spec.get("pace")
        for i in range(spec.get("count", 1)):
            s.send(frame)
            sent.append(len(frame))
            if pace and i % pace == pace - 1:
                time.sleep(0.001)
    print(json.dumps(sent))


if __name__ == "__main__":
    main()
