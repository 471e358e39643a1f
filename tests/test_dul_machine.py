"""The relay's state table, checked against an independent table written out here, cell by cell:
every (state, side, PDU type) either gives the listed transition or is an unexpected PDU (2/2)."""

from __future__ import annotations

import itertools

import pytest

from proxy.dul.constants import PDUType
from proxy.dul.machine import Action, Side, State, advance
from proxy.errors import RemotePDUError

REQ, ACC = Side.REQUESTOR, Side.ACCEPTOR
RQ, AC, RJ = PDUType.A_ASSOCIATE_RQ, PDUType.A_ASSOCIATE_AC, PDUType.A_ASSOCIATE_RJ
DATA, REL_RQ, REL_RP, ABORT = PDUType.P_DATA_TF, PDUType.A_RELEASE_RQ, PDUType.A_RELEASE_RP, PDUType.A_ABORT
STA2 = State.STA2_AWAITING_RQ
STA5 = State.STA5_AWAITING_AC
STA6 = State.STA6_ESTABLISHED
STA7R = State.STA7_REQUESTOR_RELEASING
STA7A = State.STA7_ACCEPTOR_RELEASING
STA9 = State.STA9_RELEASE_COLLISION
STA10 = State.STA10_COLLISION_AWAITING_REQUESTOR_RP
STA11 = State.STA11_COLLISION_AWAITING_ACCEPTOR_RP
STA13 = State.STA13_CLOSING

# Written from PS3.8 Table 9-10 as the relay mirrors it (standards.md section 5), not copied from
# the code: every cell not listed here must be an unexpected PDU.
EXPECTED: dict[tuple[State, Side, PDUType], tuple[Action, State]] = {
    (STA2, REQ, RQ): (Action.ASSOCIATE, STA5),
    (STA2, REQ, ABORT): (Action.CLOSE, STA13),  # AA-2: no association yet, nobody to tell
    (STA5, ACC, AC): (Action.RELAY_AC, STA6),
    (STA5, ACC, RJ): (Action.RELAY_RJ, STA13),
    (STA5, REQ, ABORT): (Action.RELAY_ABORT, STA13),
    (STA5, ACC, ABORT): (Action.RELAY_ABORT, STA13),
    (STA6, REQ, DATA): (Action.FORWARD, STA6),
    (STA6, ACC, DATA): (Action.FORWARD, STA6),
    (STA6, REQ, REL_RQ): (Action.FORWARD, STA7R),
    (STA6, ACC, REL_RQ): (Action.FORWARD, STA7A),
    (STA6, REQ, ABORT): (Action.RELAY_ABORT, STA13),
    (STA6, ACC, ABORT): (Action.RELAY_ABORT, STA13),
    (STA7R, ACC, DATA): (Action.FORWARD, STA7R),  # the side that did not ask to release still sends
    (STA7R, ACC, REL_RP): (Action.FORWARD_AND_CLOSE, STA13),
    (STA7R, ACC, REL_RQ): (Action.FORWARD, STA9),  # release collision
    (STA7R, REQ, ABORT): (Action.RELAY_ABORT, STA13),
    (STA7R, ACC, ABORT): (Action.RELAY_ABORT, STA13),
    (STA7A, REQ, DATA): (Action.FORWARD, STA7A),
    (STA7A, REQ, REL_RP): (Action.FORWARD_AND_CLOSE, STA13),
    (STA7A, REQ, REL_RQ): (Action.FORWARD, STA9),
    (STA7A, REQ, ABORT): (Action.RELAY_ABORT, STA13),
    (STA7A, ACC, ABORT): (Action.RELAY_ABORT, STA13),
    (STA9, REQ, REL_RP): (Action.FORWARD, STA11),  # requestor answered: the acceptor still owes an RP
    (STA9, ACC, REL_RP): (Action.FORWARD, STA10),
    (STA9, REQ, ABORT): (Action.RELAY_ABORT, STA13),
    (STA9, ACC, ABORT): (Action.RELAY_ABORT, STA13),
    (STA10, REQ, REL_RP): (Action.FORWARD_AND_CLOSE, STA13),
    (STA10, REQ, ABORT): (Action.RELAY_ABORT, STA13),
    (STA10, ACC, ABORT): (Action.RELAY_ABORT, STA13),
    (STA11, ACC, REL_RP): (Action.FORWARD_AND_CLOSE, STA13),
    (STA11, REQ, ABORT): (Action.RELAY_ABORT, STA13),
    (STA11, ACC, ABORT): (Action.RELAY_ABORT, STA13),
    # Sta13 (AA-6): anything that still arrives while the transports close is ignored
    **{(STA13, side, pdu_type): (Action.IGNORE, STA13) for side in Side for pdu_type in PDUType},
}

ALL_CELLS = list(itertools.product(State, Side, PDUType))
UNEXPECTED = [cell for cell in ALL_CELLS if cell not in EXPECTED]


def _id(cell: tuple[State, Side, PDUType]) -> str:
    state, side, pdu_type = cell
    return f"{state.value}-{side.value}-{pdu_type.name}"


def test_expected_table_uses_every_action_and_reachable_state() -> None:
    assert {action for action, _ in EXPECTED.values()} == set(Action)
    assert {state for _, state in EXPECTED.values()} == set(State) - {STA2}


@pytest.mark.parametrize("cell", list(EXPECTED), ids=_id)
def test_listed_transition(cell: tuple[State, Side, PDUType]) -> None:
    assert advance(*cell) == EXPECTED[cell]


@pytest.mark.parametrize("cell", UNEXPECTED, ids=_id)
def test_unexpected_pdu_is_abort_2_2_naming_state_side_and_pdu(cell: tuple[State, Side, PDUType]) -> None:
    state, side, pdu_type = cell
    with pytest.raises(RemotePDUError) as info:
        advance(state, side, pdu_type)
    error = info.value
    assert (error.source, error.reason) == (2, 2)
    message = str(error)
    assert pdu_type.name in message
    assert state.value in message
    assert side.value in message


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0x16, 0xFF])
def test_unknown_pdu_type_in_any_state(state: State, pdu_type: int) -> None:
    with pytest.raises(RemotePDUError, match=f"unexpected 0x{pdu_type:02X} from the requestor in state {state.value}"):
        advance(state, REQ, pdu_type)


def test_plain_int_pdu_types_work() -> None:
    assert advance(STA2, REQ, 0x01) == (Action.ASSOCIATE, STA5)


# ------------------------------------------------------------------------------- whole flows

Step = tuple[Side, PDUType, Action, State]

FLOWS: dict[str, list[Step]] = {
    "requestor releases": [
        (REQ, RQ, Action.ASSOCIATE, STA5),
        (ACC, AC, Action.RELAY_AC, STA6),
        (REQ, DATA, Action.FORWARD, STA6),
        (ACC, DATA, Action.FORWARD, STA6),
        (ACC, DATA, Action.FORWARD, STA6),
        (REQ, DATA, Action.FORWARD, STA6),
        (REQ, REL_RQ, Action.FORWARD, STA7R),
        (ACC, DATA, Action.FORWARD, STA7R),  # a late C-STORE-RSP still reaches the modality
        (ACC, REL_RP, Action.FORWARD_AND_CLOSE, STA13),
        (REQ, DATA, Action.IGNORE, STA13),
    ],
    "acceptor releases": [
        (REQ, RQ, Action.ASSOCIATE, STA5),
        (ACC, AC, Action.RELAY_AC, STA6),
        (ACC, REL_RQ, Action.FORWARD, STA7A),
        (REQ, DATA, Action.FORWARD, STA7A),
        (REQ, REL_RP, Action.FORWARD_AND_CLOSE, STA13),
    ],
    "rejected": [
        (REQ, RQ, Action.ASSOCIATE, STA5),
        (ACC, RJ, Action.RELAY_RJ, STA13),
        (REQ, ABORT, Action.IGNORE, STA13),
    ],
    "collision, requestor first, requestor answers first (PS3.8 order)": [
        (REQ, RQ, Action.ASSOCIATE, STA5),
        (ACC, AC, Action.RELAY_AC, STA6),
        (REQ, REL_RQ, Action.FORWARD, STA7R),
        (ACC, REL_RQ, Action.FORWARD, STA9),
        (REQ, REL_RP, Action.FORWARD, STA11),
        (ACC, REL_RP, Action.FORWARD_AND_CLOSE, STA13),
    ],
    "collision, requestor first, acceptor answers first": [
        (REQ, RQ, Action.ASSOCIATE, STA5),
        (ACC, AC, Action.RELAY_AC, STA6),
        (REQ, REL_RQ, Action.FORWARD, STA7R),
        (ACC, REL_RQ, Action.FORWARD, STA9),
        (ACC, REL_RP, Action.FORWARD, STA10),
        (REQ, REL_RP, Action.FORWARD_AND_CLOSE, STA13),
    ],
    "collision, acceptor first": [
        (REQ, RQ, Action.ASSOCIATE, STA5),
        (ACC, AC, Action.RELAY_AC, STA6),
        (ACC, REL_RQ, Action.FORWARD, STA7A),
        (REQ, REL_RQ, Action.FORWARD, STA9),
        (REQ, REL_RP, Action.FORWARD, STA11),
        (ACC, REL_RP, Action.FORWARD_AND_CLOSE, STA13),
    ],
    "requestor aborts while the upstream connects": [
        (REQ, RQ, Action.ASSOCIATE, STA5),
        (REQ, ABORT, Action.RELAY_ABORT, STA13),
        (ACC, AC, Action.IGNORE, STA13),
    ],
    "acceptor aborts mid-transfer": [
        (REQ, RQ, Action.ASSOCIATE, STA5),
        (ACC, AC, Action.RELAY_AC, STA6),
        (REQ, DATA, Action.FORWARD, STA6),
        (ACC, ABORT, Action.RELAY_ABORT, STA13),
        (REQ, DATA, Action.IGNORE, STA13),
        (REQ, REL_RQ, Action.IGNORE, STA13),
    ],
    "abort before any RQ": [
        (REQ, ABORT, Action.CLOSE, STA13),
    ],
}


@pytest.mark.parametrize("name", list(FLOWS))
def test_flow(name: str) -> None:
    state = STA2
    for i, (side, pdu_type, action, next_state) in enumerate(FLOWS[name]):
        got = advance(state, side, pdu_type)
        assert got == (action, next_state), f"step {i}: {side.value} {pdu_type.name} in {state.value}"
        state = got[1]
    assert state is STA13


# ------------------------------------------------------------------------------- aborts everywhere


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("side", list(Side))
def test_abort_in_every_state(state: State, side: Side) -> None:
    if state is STA2 and side is ACC:
        with pytest.raises(RemotePDUError) as info:  # there is no acceptor connection yet
            advance(state, side, ABORT)
        assert info.value.reason == 2
        return
    action, next_state = advance(state, side, ABORT)
    assert next_state is STA13
    expected = {STA2: Action.CLOSE, STA13: Action.IGNORE}.get(state, Action.RELAY_ABORT)
    assert action is expected


# ------------------------------------------------------------------------------- wrong-time PDUs


@pytest.mark.parametrize(
    ("state", "side", "pdu_type"),
    [
        (STA2, REQ, DATA),
        (STA2, REQ, AC),
        (STA2, REQ, REL_RQ),
        (STA2, ACC, AC),
        (STA5, REQ, DATA),
        (STA5, REQ, RQ),
        (STA5, ACC, DATA),
        (STA5, ACC, REL_RQ),
        (STA6, REQ, RQ),
        (STA6, ACC, AC),
        (STA6, REQ, REL_RP),
        (STA7R, REQ, DATA),  # the releasing side may not send more data
        (STA7R, REQ, REL_RQ),
        (STA7A, ACC, DATA),
        (STA9, REQ, DATA),
        (STA9, ACC, DATA),
        (STA9, REQ, REL_RQ),
    ],
    ids=lambda v: getattr(v, "value", getattr(v, "name", str(v))),
)
def test_wrong_time_examples(state: State, side: Side, pdu_type: PDUType) -> None:
    with pytest.raises(RemotePDUError) as info:
        advance(state, side, pdu_type)
    assert (info.value.source, info.value.reason) == (2, 2)
    assert str(info.value) == f"unexpected {pdu_type.name} from the {side.value} in state {state.value}"


@pytest.mark.parametrize(
    ("first_rp", "late"),
    [
        (ACC, (REQ, DATA)),  # the requestor already sent A-RELEASE-RQ: no more data from it (PS3.8 Sta11/12)
        (ACC, (REQ, REL_RQ)),
        (REQ, (ACC, DATA)),
        (REQ, (ACC, REL_RQ)),
    ],
    ids=["requestor-data", "requestor-rq", "acceptor-data", "acceptor-rq"],
)
def test_after_a_collision_only_the_outstanding_rp_is_expected(first_rp: Side, late: tuple[Side, PDUType]) -> None:
    _action, state = advance(STA9, first_rp, REL_RP)
    try:
        advance(state, *late)
    except RemotePDUError as exc:
        assert exc.reason == 2
        return
    raise AssertionError(f"{late[1].name} from the {late[0].value} accepted after a release collision")
