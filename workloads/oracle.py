"""The consistency oracle: did every message arrive exactly once?

Members run ``seqstream``: every sender numbers its datagrams to each peer 1, 2,
3, ... (and, separately, the records of its TCP stream to each peer) and every
receiver logs what it got. A snapshot restored correctly
rewinds senders and receivers to one consistent cut and re-injects what was in
flight, so at the end each receiver's log (its state at the restored cut, the
re-injected channel state, and what the restored senders sent next) holds every
sequence number of every peer exactly once: a gap is a lost in-flight message,
a duplicate an orphan. Only numbers sent long enough before the end are
judged (the last ones may still be on their way when the members stop); a UDP
stream from the first one that arrived (the first ones may die waiting for
ARP), a TCP stream ("a->b/tcp") from 1 (TCP is reliable: every record must
arrive, once). A broken TCP connection is never re-opened: its stream stops,
which shows as a gap, or at least as a growing "behind_udp" (how many fewer
records than datagrams the sender sent to that peer; constant while it is up).

    python -m workloads.oracle DIR [DIR...]   # member directories written by seqstream
"""

import json
import os
import sys
from typing import Dict, List, Optional

from workloads import seqstream


def stream_report(received: List[int], judged_upto: int, first: Optional[int] = None) -> dict:
    """Gaps and duplicates in what one receiver got from one sender up to ``judged_upto``, from
    ``first`` or else from the first number that arrived (a UDP stream's first datagrams may die
    waiting for ARP; a TCP stream is judged from 1)."""
    counts: Dict[int, int] = {}
    for seq in received:
        if seq <= judged_upto:
            counts[seq] = counts.get(seq, 0) + 1
    if first is None:
        first = min(counts) if counts else 1
    gaps = [seq for seq in range(first, judged_upto + 1) if seq not in counts]
    duplicates = sorted(seq for seq, n in counts.items() if n > 1)
    return {"judged_from": first, "judged_upto": judged_upto, "gaps": len(gaps), "duplicates": len(duplicates),
            "first_gaps": gaps[:10], "first_duplicates": duplicates[:10]}


PROTOCOLS = (("udp", "log", "sent", "", None), ("tcp", "tcp_log", "tcp_sent", "/tcp", 1))


def check(members: Dict[int, dict], margin: int) -> dict:
    """``members``: id -> {"log": [(sender, seq, t)], "sent": {peer id: last seq sent}} and, for TCP,
    the same as "tcp_log" and "tcp_sent" (a member without "tcp_sent" sent no TCP). Consistent: no
    gaps or duplicates; ``totals["tcp"]["max_behind_udp"]`` is for the caller to judge."""
    streams = {}
    totals = {"gaps": 0, "duplicates": 0, "streams": 0, "udp": {"gaps": 0, "duplicates": 0, "streams": 0},
              "tcp": {"gaps": 0, "duplicates": 0, "streams": 0}}
    for protocol, log_key, sent_key, suffix, first in PROTOCOLS:
        for receiver, data in sorted(members.items()):
            by_sender: Dict[int, List[int]] = {}
            for sender, seq, _t in data.get(log_key, []):
                by_sender.setdefault(sender, []).append(seq)
            for sender, info in sorted(members.items()):
                sent = info.get(sent_key, {})
                if sender == receiver or receiver not in sent:
                    continue
                report = stream_report(by_sender.get(sender, []), max(0, sent[receiver] - margin), first)
                if protocol == "tcp" and receiver in info.get("sent", {}):  # grows once a connection broke
                    report["behind_udp"] = info["sent"][receiver] - sent[receiver]
                    totals["tcp"]["max_behind_udp"] = max(totals["tcp"].get("max_behind_udp", 0), report["behind_udp"])
                streams["%d->%d%s" % (sender, receiver, suffix)] = report
                for counts in (totals, totals[protocol]):
                    counts["gaps"] += report["gaps"]
                    counts["duplicates"] += report["duplicates"]
                    counts["streams"] += 1
    return {"totals": totals, "streams": streams, "consistent": totals["gaps"] == totals["duplicates"] == 0}


def load(directories: List[str], margin: int = 100) -> dict:
    """Read seqstream member directories (member.log, member.progress, member.id) and check them."""
    return check(load_records(directories), margin)


def load_records(directories: List[str]) -> Dict[int, dict]:
    """Member id -> what ``check`` judges, from seqstream member directories (other members,
    such as VM guests, can be added to the result before checking)."""
    members = {}
    for directory in directories:
        with open(os.path.join(directory, "member.id")) as handle:
            ident, peers = json.load(handle)
        progress, log = os.path.join(directory, "member.progress"), os.path.join(directory, "member.log")
        sent = [{peer: last for peer, (_about, last) in seqstream.read_progress(progress, peers, tcp).items()}
                for tcp in (False, True)]
        members[ident] = {"log": seqstream.parse_log(log), "sent": sent[0],
                          "tcp_log": seqstream.parse_log(log, tcp=True), "tcp_sent": sent[1]}
    return members


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2 if not argv else 0
    try:
        result = load(argv)
    except (OSError, ValueError) as error:
        print("oracle: %s" % error, file=sys.stderr)
        return 2
    print(json.dumps(result["totals"]), "consistent" if result["consistent"] else "VIOLATIONS")
    return 0 if result["consistent"] else 1


if __name__ == "__main__":
    sys.exit(main())
