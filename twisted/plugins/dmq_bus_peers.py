"""Peers bundled with dmq-bus, found by C{--peer NAME} like any third-party peer."""

from dmq_bus.peers.echo import EchoPeerFactory
from dmq_bus.peers.htable import HTablePeerFactory
from dmq_bus.peers.observed import (
    DialogObserverFactory,
    PresenceObserverFactory,
    UsrlocObserverFactory,
)

echo = EchoPeerFactory()
htable = HTablePeerFactory()
dialog = DialogObserverFactory()
usrloc = UsrlocObserverFactory()
presence = PresenceObserverFactory()
