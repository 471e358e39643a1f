"""The relay's association state machine: one table of (state, side, PDU type) -> (action, next state).

A relay stands between two DUL state machines (PS3.8 9.2, Table 9-10): it is the acceptor to the
requestor (the modality) and the requestor to the acceptor (the archive). Because it forwards
rather than answers, one combined state is enough; the names follow the PS3.8 states they mirror.
Anything the table does not list is an unexpected PDU: A-ABORT with reason 2 (AA-8).
"""

from __future__ import annotations

from enum import Enum

from proxy.dul.constants import PDUType
from proxy.errors import RemotePDUError


class Side(Enum):
    REQUESTOR = "requestor"  # the peer that sent the A-ASSOCIATE-RQ (the modality)
    ACCEPTOR = "acceptor"  # the upstream archive

    # Members are singletons compared by identity, so identity hashing is exact; Enum's own
    # __hash__ is Python code, and the relay looks sides up on every read.
    __hash__ = object.__hash__


class State(Enum):
    STA2_AWAITING_RQ = "Sta2"  # transport open, ARTIM running, no A-ASSOCIATE-RQ yet
    STA5_AWAITING_AC = "Sta5"  # RQ relayed (or upstream connecting); client side is in Sta3
    STA6_ESTABLISHED = "Sta6"
    STA7_REQUESTOR_RELEASING = "Sta7-requestor"  # requestor's RELEASE-RQ relayed, awaiting RP
    STA7_ACCEPTOR_RELEASING = "Sta7-acceptor"  # acceptor's RELEASE-RQ relayed, awaiting RP
    STA9_RELEASE_COLLISION = "Sta9"  # both sides sent RELEASE-RQ
    STA10_COLLISION_AWAITING_REQUESTOR_RP = "Sta10"  # collision; the acceptor's RP has been relayed
    STA11_COLLISION_AWAITING_ACCEPTOR_RP = "Sta11"  # collision; the requestor's RP has been relayed
    STA13_CLOSING = "Sta13"  # RJ, last RP or A-ABORT relayed; waiting for the transports to close

    __hash__ = object.__hash__  # as Side: the state table is looked up for every PDU


class Action(Enum):
    ASSOCIATE = "associate"  # parse the RQ, decide, open the upstream
    RELAY_AC = "relay-ac"
    RELAY_RJ = "relay-rj"
    FORWARD = "forward"  # P-DATA-TF, RELEASE-RQ
    FORWARD_AND_CLOSE = "forward-and-close"  # the RELEASE-RP that ends the association
    RELAY_ABORT = "relay-abort"
    CLOSE = "close"  # AA-2: the peer aborted before an association existed
    IGNORE = "ignore"  # AA-6


REQ, ACC = Side.REQUESTOR, Side.ACCEPTOR
S = State
P = PDUType
A = Action

_TABLE: dict[tuple[State, Side, int], tuple[Action, State]] = {
    (S.STA2_AWAITING_RQ, REQ, P.A_ASSOCIATE_RQ): (A.ASSOCIATE, S.STA5_AWAITING_AC),
    (S.STA2_AWAITING_RQ, REQ, P.A_ABORT): (A.CLOSE, S.STA13_CLOSING),
    (S.STA5_AWAITING_AC, ACC, P.A_ASSOCIATE_AC): (A.RELAY_AC, S.STA6_ESTABLISHED),
    (S.STA5_AWAITING_AC, ACC, P.A_ASSOCIATE_RJ): (A.RELAY_RJ, S.STA13_CLOSING),
    (S.STA6_ESTABLISHED, REQ, P.P_DATA_TF): (A.FORWARD, S.STA6_ESTABLISHED),
    (S.STA6_ESTABLISHED, ACC, P.P_DATA_TF): (A.FORWARD, S.STA6_ESTABLISHED),
    (S.STA6_ESTABLISHED, REQ, P.A_RELEASE_RQ): (A.FORWARD, S.STA7_REQUESTOR_RELEASING),
    (S.STA6_ESTABLISHED, ACC, P.A_RELEASE_RQ): (A.FORWARD, S.STA7_ACCEPTOR_RELEASING),
    # AR-6/AR-7: data from the side that has not asked to release is still delivered
    (S.STA7_REQUESTOR_RELEASING, ACC, P.P_DATA_TF): (A.FORWARD, S.STA7_REQUESTOR_RELEASING),
    (S.STA7_REQUESTOR_RELEASING, ACC, P.A_RELEASE_RP): (A.FORWARD_AND_CLOSE, S.STA13_CLOSING),
    (S.STA7_REQUESTOR_RELEASING, ACC, P.A_RELEASE_RQ): (A.FORWARD, S.STA9_RELEASE_COLLISION),
    (S.STA7_ACCEPTOR_RELEASING, REQ, P.P_DATA_TF): (A.FORWARD, S.STA7_ACCEPTOR_RELEASING),
    (S.STA7_ACCEPTOR_RELEASING, REQ, P.A_RELEASE_RP): (A.FORWARD_AND_CLOSE, S.STA13_CLOSING),
    (S.STA7_ACCEPTOR_RELEASING, REQ, P.A_RELEASE_RQ): (A.FORWARD, S.STA9_RELEASE_COLLISION),
    # PS3.8 9.2.2 release collision: each RP answers the other side's RQ
    (S.STA9_RELEASE_COLLISION, ACC, P.A_RELEASE_RP): (A.FORWARD, S.STA10_COLLISION_AWAITING_REQUESTOR_RP),
    (S.STA9_RELEASE_COLLISION, REQ, P.A_RELEASE_RP): (A.FORWARD, S.STA11_COLLISION_AWAITING_ACCEPTOR_RP),
    (S.STA10_COLLISION_AWAITING_REQUESTOR_RP, REQ, P.A_RELEASE_RP): (A.FORWARD_AND_CLOSE, S.STA13_CLOSING),
    (S.STA11_COLLISION_AWAITING_ACCEPTOR_RP, ACC, P.A_RELEASE_RP): (A.FORWARD_AND_CLOSE, S.STA13_CLOSING),
}
for _state in State:
    if _state is State.STA13_CLOSING:
        for _side in Side:
            for _type in PDUType:
                _TABLE[(_state, _side, _type)] = (A.IGNORE, _state)
    elif _state is not State.STA2_AWAITING_RQ:
        for _side in Side:
            _TABLE[(_state, _side, P.A_ABORT)] = (A.RELAY_ABORT, S.STA13_CLOSING)


def advance(state: State, side: Side, pdu_type: int) -> tuple[Action, State]:
    """The transition for a PDU from `side`; RemotePDUError (A-ABORT 2/2) when it is unexpected."""
    try:
        return _TABLE[(state, side, pdu_type)]
    except KeyError:
        name = PDUType(pdu_type).name if pdu_type in PDUType._value2member_map_ else f"0x{pdu_type:02X}"
        raise RemotePDUError(
            f"unexpected {name} from the {side.value} in state {state.value}", source=2, reason=2
        ) from None
