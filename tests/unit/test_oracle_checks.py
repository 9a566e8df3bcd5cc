from hostside.oracle import check, stream_report


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
