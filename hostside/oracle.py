"""The consistency oracle: did every message arrive exactly once?

Members run ``seqstream``: every sender numbers its datagrams to each peer 1, 2,
3, ... and every receiver logs what it got. A snapshot restored correctly
rewinds senders and receivers to one consistent cut and re-injects what was in
flight, so at the end each receiver's log (its state at the restored cut, the
re-injected channel state, and what the restored senders sent next) holds every
sequence number of every peer exactly once: a gap is a lost in-flight message,
a duplicate an orphan. Only numbers sent long enough before the end are
judged (the last ones may still be on their way when the members stop), from
the first one that arrived (the first ones may die waiting for ARP).

    python -m hostside.oracle DIR [DIR...]   # member directories written by seqstream
"""

import json
import os
import sys
from typing import Dict, List

from hostside import seqstream


def stream_report(received: List[int], judged_upto: int) -> dict:
    """Gaps and duplicates in what one receiver got from one sender, from the first number
    that arrived (a stream's first datagrams may die waiting for ARP) up to ``judged_upto``."""
    counts: Dict[int, int] = {}
    for seq in received:
        if seq <= judged_upto:
            counts[seq] = counts.get(seq, 0) + 1
    first = min(counts) if counts else 1
    gaps = [seq for seq in range(first, judged_upto + 1) if seq not in counts]
    duplicates = sorted(seq for seq, n in counts.items() if n > 1)
    return {"judged_from": first, "judged_upto": judged_upto, "gaps": len(gaps), "duplicates": len(duplicates),
            "first_gaps": gaps[:10], "first_duplicates": duplicates[:10]}


def check(members: Dict[int, dict], margin: int) -> dict:
    """``members``: id -> {"log": [(sender, seq, t)], "sent": {peer id: last seq sent}}."""
    streams, totals = {}, {"gaps": 0, "duplicates": 0, "streams": 0}
    for receiver, data in sorted(members.items()):
        by_sender: Dict[int, List[int]] = {}
        for sender, seq, _t in data["log"]:
            by_sender.setdefault(sender, []).append(seq)
        for sender, info in sorted(members.items()):
            if sender == receiver or receiver not in info["sent"]:
                continue
            report = stream_report(by_sender.get(sender, []), max(0, info["sent"][receiver] - margin))
            streams["%d->%d" % (sender, receiver)] = report
            totals["gaps"] += report["gaps"]
            totals["duplicates"] += report["duplicates"]
            totals["streams"] += 1
    return {"totals": totals, "streams": streams, "consistent": totals["gaps"] == totals["duplicates"] == 0}


def load(directories: List[str], margin: int = 100) -> dict:
    """Read seqstream member directories (member.log, member.progress, member.id) and check them."""
    members = {}
    for directory in directories:
        with open(os.path.join(directory, "member.id")) as handle:
            ident, peers = json.load(handle)
        progress = seqstream.read_progress(os.path.join(directory, "member.progress"), peers)
        members[ident] = {"log": seqstream.parse_log(os.path.join(directory, "member.log")),
                          "sent": {peer: last for peer, (_about, last) in progress.items()}}
    return check(members, margin)


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
