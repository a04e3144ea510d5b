"""
The C{echo} peer: answers every KDMQ on channel C{echo} with its own body.
A probe for tests, benchmarks and operators.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from dmq_bus.bus.values import DMQMessage, PeerResponse
from dmq_bus.interfaces import IDMQBus, IDMQPeer, IDMQPeerFactory


@implementer(IDMQPeer)
class EchoPeer:
    """Answers C{200 OK} with the request's body and content type."""

    description = "answers every message with its own body"

    def __init__(self, channel: str = "echo") -> None:
        self.channel = channel
        self.received = 0

    def messageReceived(self, message: DMQMessage) -> PeerResponse:
        self.received += 1
        return PeerResponse(200, "OK", message.body, message.contentType)

    def busJoined(self) -> None:
        """Nothing to sync."""


@implementer(IPlugin, IDMQPeerFactory)
class EchoPeerFactory:
    """C{--peer echo[=CHANNEL]}: an L{EchoPeer} on C{CHANNEL} (default C{echo})."""

    name = "echo"
    description = "answer every message on channel 'echo' (or =CHANNEL) with its body"

    def makePeer(self, bus: IDMQBus, options: str) -> IDMQPeer:
        channel = options or "echo"
        if not channel.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"echo: bad channel name {channel!r}")
        return EchoPeer(channel)
