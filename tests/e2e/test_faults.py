"""Device faults: a device that goes down and comes back, and one that is deleted and
created again (new ifindex), are reported as such and counted again afterwards, exactly
and nothing twice."""

from conftest import INTERVAL
from harness import Tcpdump, interval_sums, run, start_in_a_fresh_interval, wait_for


def state(cluster, device):
    return cluster.sql(f"SELECT state FROM pg_netstat_devices WHERE device = '{device}'")


def counted_exactly_after(cluster, netns, tmp_path):
    start_in_a_fresh_interval(cluster, INTERVAL, netns.name)
    with Tcpdump(netns.host_if, cluster.port, tmp_path) as dump:
        for _ in range(5):
            assert cluster.sql("SELECT count(*) FROM generate_series(1, 1000)", host=netns.host_ip,
                               netns=netns.name) == "1000"
        dump.wait_closed()
    want = dump.tally()
    got, _, _ = interval_sums(cluster, netns.host_if, want["first_sec"], want["last_sec"])
    assert want["packets_in"] >= 5 * 5
    assert got == {k: want[k] for k in got}


def test_device_down_then_up(cluster, netns, tmp_path):
    downs = cluster.log().count(f'network device "{netns.host_if}" is down')
    netns.set_host_link("down")
    try:
        wait_for("state down", lambda: state(cluster, netns.host_if) == "down", timeout=20)
        assert state(cluster, "lo") == "capturing"
    finally:
        netns.set_host_link("up")
        # Linux forgets IPv6 addresses on link down.
        run(["ip", "-6", "addr", "add", f"{netns.host_ip6}/64", "dev", netns.host_if, "nodad"], check=False)
    wait_for("capturing again", lambda: state(cluster, netns.host_if) == "capturing", timeout=30)
    assert cluster.log().count(f'network device "{netns.host_if}" is down') == downs + 1
    counted_exactly_after(cluster, netns, tmp_path)


def test_device_deleted_then_created_again(cluster, netns, tmp_path):
    before = int(open(f"/sys/class/net/{netns.host_if}/ifindex").read())
    netns.delete_link()
    try:
        wait_for("state missing", lambda: state(cluster, netns.host_if) == "missing", timeout=20)
        assert state(cluster, "lo") == "capturing"
        error = cluster.sql(f"SELECT last_error FROM pg_netstat_devices WHERE device = '{netns.host_if}'")
        assert "removed" in error or "no such device" in error, error
    finally:
        netns.create_link()
    after = int(open(f"/sys/class/net/{netns.host_if}/ifindex").read())
    assert after != before
    wait_for("capturing the new device", lambda: state(cluster, netns.host_if) == "capturing", timeout=40)
    counted_exactly_after(cluster, netns, tmp_path)
