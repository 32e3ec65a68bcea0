"""Topologies: consistent send/receive relations, the exponential graph's reach, the registry."""

import math

import pytest

from federation.transport.topology import make_topology

NAMES = ["exponential", "ring", "full"]
SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 16]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", SIZES)
def test_send_and_receive_relations_agree_in_every_round(name: str, k: int) -> None:
    topology = make_topology(name, k)
    for round in range(2 * max(1, math.ceil(math.log2(k))) + 1):
        sends = {(i, j) for i in range(k) for j in topology.peers(i, round)[0]}
        receives = {(j, i) for i in range(k) for j in topology.peers(i, round)[1]}
        assert sends == receives, f"{name} K={k} round {round}"
        assert all(i != j for i, j in sends)


@pytest.mark.parametrize("k", SIZES)
def test_exponential_graph_matches_the_proxyfl_rule(k: int) -> None:
    topology = make_topology("exponential", k)
    for round in range(10):
        for i in range(k):
            send_to, recv_from = topology.peers(i, round)
            if k == 1:
                assert (send_to, recv_from) == ([], [])
                continue
            hop = 2 ** (round % math.ceil(math.log2(k)))
            assert send_to == [(i + hop) % k]
            assert recv_from == [(i - hop) % k]


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17])
def test_exponential_graph_spreads_every_model_to_everyone_in_ceil_log2_rounds(k: int) -> None:
    """Starting at any round, after ceil(log2 K) rounds of keep-or-forward every client has
    been reached by every other client's model, i.e. the union of the rounds connects all."""
    topology = make_topology("exponential", k)
    period = math.ceil(math.log2(k))
    for start in range(period):
        reached = {i: {i} for i in range(k)}  # client -> origins whose model has arrived
        for round in range(start, start + period):
            incoming = {i: set(reached[i]) for i in range(k)}
            for i in range(k):
                for j in topology.peers(i, round)[0]:
                    incoming[j] |= reached[i]
            reached = incoming
        assert all(origins == set(range(k)) for origins in reached.values()), (k, start)


def test_exponential_graph_with_fewer_rounds_does_not_yet_reach_everyone() -> None:
    topology = make_topology("exponential", 8)
    reached = {i: {i} for i in range(8)}
    for round in range(2):
        incoming = {i: set(reached[i]) for i in range(8)}
        for i in range(8):
            for j in topology.peers(i, round)[0]:
                incoming[j] |= reached[i]
        reached = incoming
    assert all(len(origins) == 4 for origins in reached.values())


def test_ring_and_full_peers() -> None:
    assert make_topology("ring", 4).peers(0, 7) == ([1], [3])
    assert make_topology("ring", 2).peers(1, 0) == ([0], [0])
    assert make_topology("full", 4).peers(2, 0) == ([0, 1, 3], [0, 1, 3])
    assert make_topology("full", 1).peers(0, 0) == ([], [])


def test_routes_builds_exchange_dicts_for_owned_clients() -> None:
    send_to, recv_from = make_topology("exponential", 8).routes([1, 5], round=1)
    assert send_to == {1: [3], 5: [7]}
    assert recv_from == {1: [7], 5: [3]}


def test_unknown_names_and_bad_clients_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown topology 'star'"):
        make_topology("star", 4)
    with pytest.raises(ValueError, match="at least one client"):
        make_topology("ring", 0)
    with pytest.raises(ValueError, match=r"client 4 is not in 0..3"):
        make_topology("exponential", 4).peers(4, 0)
