import struct

from workloads import seqstream
from workloads.oracle import check, stream_report


def test_exactly_once_is_consistent_and_gaps_and_duplicates_are_counted():
    assert stream_report([1, 2, 3, 4], 4)["gaps"] == 0
    assert stream_report([3, 4], 4)["gaps"] == 0  # judged from the first arrival
    report = stream_report([1, 3, 3, 4, 9], 5)
    assert (report["gaps"], report["duplicates"], report["first_gaps"], report["first_duplicates"]) == (2, 1, [2, 5], [3])


def test_check_judges_only_what_had_time_to_arrive():
    members = {1: {"log": [(2, s, 0) for s in range(1, 96)], "sent": {2: 100}},
               2: {"log": [(1, s, 0) for s in range(1, 101)] + [(1, 50, 0)], "sent": {1: 100}}}
    result = check(members, margin=5)
    assert result["streams"]["2->1"]["gaps"] == 0 and result["streams"]["1->2"]["duplicates"] == 1
    assert not result["consistent"]


def test_tcp_streams_are_judged_from_one_beside_udp():
    udp = [(2, s, 0) for s in range(3, 101)]  # UDP: its first datagrams died waiting for ARP
    members = {1: {"log": udp, "sent": {2: 100},
                   "tcp_log": [(2, s, 0) for s in range(2, 101)], "tcp_sent": {2: 100}},
               2: {"log": [(1, s, 0) for s in range(1, 101)], "sent": {1: 100},
                   "tcp_log": [(1, s, 0) for s in list(range(1, 101)) + [7]], "tcp_sent": {1: 100}}}
    result = check(members, margin=5)
    assert result["streams"]["2->1"]["gaps"] == 0  # UDP: from the first arrival
    assert result["streams"]["2->1/tcp"]["first_gaps"] == [1]  # TCP: the first record must arrive
    assert result["streams"]["1->2/tcp"]["first_duplicates"] == [7]
    assert result["totals"]["streams"] == 4
    assert result["totals"]["tcp"] == {"gaps": 1, "duplicates": 1, "streams": 2, "max_behind_udp": 0}
    assert result["totals"]["udp"] == {"gaps": 0, "duplicates": 0, "streams": 2} and not result["consistent"]
    members[2]["tcp_sent"] = {1: 60}  # its connection to 1 broke at 60 (and nothing was lost)
    result = check(members, margin=5)
    assert result["streams"]["2->1/tcp"]["behind_udp"] == 40 and result["totals"]["tcp"]["max_behind_udp"] == 40
    del members[1]["tcp_sent"], members[2]["tcp_sent"]  # UDP-only members: no TCP streams judged
    assert check(members, margin=5)["totals"]["streams"] == 2 and check(members, margin=5)["consistent"]


def test_logs_and_progress_files_of_both_kinds(tmp_path):
    log = tmp_path / "member.log"
    log.write_text("2 1 10\nt 2 1 11\n2 2 12\nt 2 2 13\nt 2 3\n")
    assert seqstream.parse_log(str(log)) == [(2, 1, 10), (2, 2, 12)]  # 3 columns: UDP, as before
    assert seqstream.parse_log(str(log), tcp=True) == [(2, 1, 11), (2, 2, 13)]
    progress = tmp_path / "member.progress"
    progress.write_bytes(struct.pack("<qqqqqqqq", 5, 4, 9, 9, 3, 3, 8, 7))
    assert seqstream.read_progress(str(progress), [2, 3]) == {2: (5, 4), 3: (9, 9)}
    assert seqstream.read_progress(str(progress), [2, 3], tcp=True) == {2: (3, 3), 3: (8, 7)}
    progress.write_bytes(struct.pack("<qqqq", 5, 4, 9, 9))  # a UDP-only member (--no-tcp)
    assert seqstream.read_progress(str(progress), [2, 3], tcp=True) == {}
