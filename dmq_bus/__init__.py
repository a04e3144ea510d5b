"""
dmq-bus: a distributed message queue bus on Twisted that speaks Kamailio's
DMQ (KDMQ) protocol on the wire.
"""

__version__ = "0.1.0"
