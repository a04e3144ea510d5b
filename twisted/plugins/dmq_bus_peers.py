"""Peers bundled with dmq-bus, found by C{--peer NAME} like any third-party peer."""

from dmq_bus.peers.echo import EchoPeerFactory
from dmq_bus.peers.htable import HTablePeerFactory

echo = EchoPeerFactory()
htable = HTablePeerFactory()
